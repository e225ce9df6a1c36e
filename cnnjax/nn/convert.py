"""PyTorch state_dict files -> Flax variables ({'params', 'batch_stats'}) of a cnnjax model.

The target model's own variables (or their `jax.eval_shape`) drive the conversion: every Flax leaf
names the torch key it comes from, by the module path joined with '.' and the leaf's role.

    Flax leaf                                  torch key                  layout
    params/.../kernel (4-d, HWIO)              .../weight (OIHW)          transpose (2, 3, 1, 0)
    params/.../kernel (2-d, in x out)          .../weight (out x in)      transpose
    params/.../bias                            .../bias
    params/.../scale                           .../weight (BatchNorm)
    batch_stats/.../mean, .../var              .../running_mean, running_var

So `params/layer2/0/downsample/0/kernel` reads `layer2.0.downsample.0.weight`: `cnnjax.nn.resnet`
names its modules as torchvision does. `num_batches_tracked` is ignored (Flax BN has a fixed
momentum). Every problem, a missing key, a shape that does not fit, a key nothing reads, is
collected and raised as one ValueError naming each key, both shapes and the Flax path.

Files: `.pth`/`.pt` are read with `torch.load(weights_only=True)` (no pickled code runs; torch is an
optional dependency, `pip install cnnjax[torch]`), `.safetensors` with the `safetensors` package.
Nothing is ever downloaded.
"""

from __future__ import annotations

import pathlib
import pickle
from typing import Any, Iterable, Mapping

import jax
import numpy as np

IGNORED_SUFFIXES = ("num_batches_tracked",)


def path_name(path) -> str:
    """'params/layer1/0/conv1/kernel' for a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def read_state_dict(path: pathlib.Path | str) -> dict[str, np.ndarray]:
    """{'conv1.weight': float32 array, ...} from a `.pth`/`.pt` or `.safetensors` state_dict file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}; cnnjax never downloads weights: pass "
                                f"the path of a .pth/.pt or .safetensors state_dict you have.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(f"reading {path} needs the safetensors package: "
                              f"pip install safetensors") from err
        raw: Mapping[str, Any] = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"reading {path} needs PyTorch (pip install 'cnnjax[torch]'), or "
                              f"convert the file to .safetensors first.") from err
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refused the pickle, or not a pickle
            reason = (str(err).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
            raise ValueError(f"{path} was not loaded: it is not a torch.save file, or it pickles "
                             f"more than tensors, whose code is never run ({reason[:160]}); save "
                             f"`model.state_dict()` with torch.save, or convert it to "
                             f".safetensors.") from None
        except (RuntimeError, EOFError) as err:  # not a torch file, or a truncated one
            raise ValueError(f"{path} is not a readable torch.save file ({err}); download or save "
                             f"it again.") from None
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .pth, .pt, "
                         f".bin (torch.save of a state_dict) or .safetensors.")
    if not isinstance(raw, Mapping) or not all(hasattr(v, "shape") for v in raw.values()):
        keys = list(raw)[:8] if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"{path} does not hold a flat state_dict of tensors (found {keys}); save "
                         f"`model.state_dict()`, or the inner dict of a training checkpoint "
                         f"(e.g. torch.save(ckpt['state_dict'], path)).")
    return {k: _to_numpy(v) for k, v in raw.items()}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bf16/f16 weights are widened on the torch side
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def torch_key(flax_path: str) -> tuple[str, str]:
    """('params/layer1/0/bn1/scale') -> ('layer1.0.bn1.weight', role) where role says the layout."""
    collection, *modules, leaf = flax_path.split("/")
    module = ".".join(modules)
    if collection == "batch_stats":
        roles = {"mean": "running_mean", "var": "running_var"}
        if leaf not in roles:
            raise ValueError(f"{flax_path}: no torch counterpart for batch statistic {leaf!r}.")
        return f"{module}.{roles[leaf]}", "copy"
    if collection != "params":
        raise ValueError(f"{flax_path}: only 'params' and 'batch_stats' are converted.")
    if leaf == "kernel":
        return f"{module}.weight", "kernel"
    if leaf == "scale":
        return f"{module}.weight", "copy"
    if leaf == "bias":
        return f"{module}.bias", "copy"
    raise ValueError(f"{flax_path}: no torch counterpart for parameter {leaf!r}.")


def _to_flax_layout(value: np.ndarray, role: str, ndim: int) -> np.ndarray:
    if role == "kernel" and value.ndim == 4 and ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if role == "kernel" and value.ndim == 2 and ndim == 2:
        return value.T  # (out, in) -> (in, out)
    return value


def _matches(path: str, prefixes: Iterable[str]) -> bool:
    parts = path.split("/")[1:]  # drop the collection
    return any(parts[:len(p.split("/"))] == p.split("/") for p in prefixes)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], template: dict[str, Any], *,
                  keep: Iterable[str] = (), gray_stem: str | None = None,
                  source: str = "state_dict") -> dict[str, Any]:
    """The template's variables with every leaf replaced by its torch counterpart.

    `template`: the target model's {'params', 'batch_stats'} (arrays, or shapes from eval_shape if
    `keep` is empty). `keep`: module paths ('fc') whose template values are kept, and whose torch
    keys are skipped: a new head for other classes. `gray_stem`: the module path of a 1-channel
    first conv ('conv1') whose RGB torch kernel is summed over its input channels (the same function
    on a gray image as the RGB kernel on that image repeated to 3 channels).
    Raises one ValueError naming every missing, mis-shaped and unused key.
    """
    keep = tuple(keep)
    flat = jax.tree_util.tree_flatten_with_path(template, is_leaf=lambda x: hasattr(x, "shape"))
    leaves, treedef = flat
    used, problems, out = set(), [], []
    for path, leaf in leaves:
        name = path_name(path)
        if _matches(name, keep):
            if not isinstance(leaf, (np.ndarray, jax.Array)):
                raise ValueError(f"{name} is kept from the template, which must then hold arrays "
                                 f"(initialize the model), not {type(leaf).__name__}.")
            out.append(leaf)
            continue
        key, role = torch_key(name)
        want = tuple(leaf.shape)
        if key not in state_dict:
            torch_shape = _torch_shape(want, role)
            problems.append(f"  {key}: missing (for {name}, torch shape {torch_shape})")
            out.append(None)
            continue
        used.add(key)
        value = np.asarray(state_dict[key], np.float32)
        if gray_stem is not None and name == f"params/{gray_stem}/kernel" and value.ndim == 4 \
                and value.shape[1] == 3 and want[2] == 1:
            value = value.sum(axis=1, keepdims=True)
        value = _to_flax_layout(value, role, len(want))
        if tuple(value.shape) != want:
            problems.append(f"  {key}: shape {tuple(np.shape(state_dict[key]))} does not fit "
                            f"{name}, which needs torch shape {_torch_shape(want, role)}")
        out.append(value)
    skipped = {k for k in state_dict if _matches("x/" + k.replace(".", "/"), keep)}
    unused = sorted(k for k in state_dict if k not in used and k not in skipped
                    and not k.endswith(IGNORED_SUFFIXES))
    problems += [f"  {k}: shape {tuple(np.shape(state_dict[k]))} in the file, not read by the "
                 f"model" for k in unused]
    if problems:
        raise ValueError(f"{source} does not fit the model ({len(problems)} problems):\n"
                         + "\n".join(problems) + "\nCheck the architecture options (model.name, "
                         "model.kwargs' width, stem, grayscale) against the weights' model; "
                         "a new head is listed in transfer.head.")
    return jax.tree_util.tree_unflatten(treedef, out)


def _torch_shape(flax_shape: tuple, role: str) -> tuple:
    if role == "kernel" and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if role == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def load_torch_weights(path: pathlib.Path | str, template: dict[str, Any], *,
                       keep: Iterable[str] = (), gray_stem: str | None = None) -> dict[str, Any]:
    """`read_state_dict` then `torch_to_flax`: a torchvision-layout weights file for `template`."""
    return torch_to_flax(read_state_dict(path), template, keep=keep, gray_stem=gray_stem,
                         source=str(path))
