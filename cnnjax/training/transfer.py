"""Transfer learning: a trained backbone, a new head, frozen or slower layers, later unfreezing.

Where the weights come from (`transfer.backbone`): a torchvision-layout state_dict file
(`cnnjax/convert.py`) or the checkpoint of an earlier cnnjax run, at its best step or
`transfer.step`. Either way the new model's own initialization is kept for the head
(`transfer.head`, torchvision's 'fc'), and every other parameter and batch statistic must be found
with the model's shape, or the load fails naming each path that is missing or does not fit.

How the optimizer treats each parameter is a label given by its path (`param_labels`):

    'head'      the new classifier: the run's optimizer (`make_optimizer(cfg.optim)`)
    'backbone'  everything else that trains: the same, scaled by `transfer.backbone_lr_scale`
    'frozen'    `transfer.freeze`: `optax.set_to_zero()`, no update and no optimizer state
    'late'      frozen prefixes in `transfer.unfreeze`: the backbone transform behind
                `optax.transforms.conditionally_mask`, zero until its own update count reaches
                unfreeze_after_epochs * steps_per_epoch; its Adam moments start from zero then,
                as for a parameter group added to a torch optimizer at that epoch.

optimized as `optim.ParamGroups` (`optax.multi_transform`). The schedule lives in the optimizer
state, so it is saved with every checkpoint and a resumed run unfreezes at the same step. Frozen
batch norm layers must also stay in inference mode, which the optimizer cannot see:
`model_for_epoch` hands the model its frozen prefixes (`cnnjax.nn.resnet.ResNet.frozen`) for the
epoch, which the loop recompiles for at the unfreezing epoch, once. `plan` gives the run's builder
both.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import numpy as np

from cnnjax.training import checkpoint, rundir
from cnnjax.nn import convert
from cnnjax.config import Config, TransferConfig
from cnnjax.training.optim import ParamGroups
from cnnjax.nn.resnet import ResNet, is_frozen

BACKBONE = "backbone"  # in transfer.freeze: every top-level module outside transfer.head
WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors")


# ---------------------------------------------------------------------------------------------
# Which parameter is which
# ---------------------------------------------------------------------------------------------

def _paths(tree) -> list[tuple[str, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return [tuple(convert.path_name(p).split("/")) for p, _ in flat]


def expand(prefixes: Sequence[str], params, head: Sequence[str], what: str) -> tuple[str, ...]:
    """`prefixes` with 'backbone' replaced by the top-level modules outside `head`; each must match.

    Raises ValueError naming a prefix that matches no parameter, with the model's top-level modules.
    """
    tops = list(params)  # top-level module names
    head_tops = {h.split("/")[0] for h in head}
    out: list[str] = []
    for prefix in prefixes:
        if prefix == BACKBONE:
            out += [t for t in tops if t not in head_tops]
            continue
        if not any(is_frozen(path, (prefix,)) for path in _paths(params)):
            raise ValueError(f"transfer.{what}: {prefix!r} names no parameter of the model; "
                             f"paths look like 'layer1' or 'layer4/1/conv2', top-level modules: "
                             f"{', '.join(tops)} (or '{BACKBONE}': all but the head).")
        out.append(prefix)
    return tuple(dict.fromkeys(out))


def check_transfer(tc: TransferConfig, params) -> None:
    """Raises ValueError for settings that contradict each other or the model's parameters."""
    if tc.backbone_lr_scale <= 0:
        raise ValueError(f"transfer.backbone_lr_scale must be positive, got {tc.backbone_lr_scale}; "
                         f"freeze layers with transfer.freeze instead of a zero rate.")
    if tc.unfreeze_after_epochs < 0:
        raise ValueError(f"transfer.unfreeze_after_epochs must be >= 0, got {tc.unfreeze_after_epochs}.")
    if bool(tc.unfreeze) != (tc.unfreeze_after_epochs > 0):
        raise ValueError(f"transfer.unfreeze ({tc.unfreeze}) and transfer.unfreeze_after_epochs "
                         f"({tc.unfreeze_after_epochs}) go together: set both or neither.")
    head = expand(tc.head, params, (), "head")
    freeze = expand(tc.freeze, params, head, "freeze")
    unfreeze = expand(tc.unfreeze, params, head, "unfreeze")
    for prefix in freeze:
        if any(is_frozen(tuple(prefix.split("/")), (h,)) or is_frozen(tuple(h.split("/")), (prefix,))
               for h in head):
            raise ValueError(f"transfer.freeze {prefix!r} overlaps the new head {head}; a new head "
                             f"must train.")
    for u in unfreeze:
        for f in freeze:
            if is_frozen(tuple(u.split("/")), (f,)) and f != u:
                raise ValueError(f"transfer.unfreeze {u!r} would unfreeze part of the frozen "
                                 f"{f!r}; list the parts of {f!r} in transfer.freeze instead.")
        if not any(is_frozen(tuple(f.split("/")), (u,)) for f in freeze):
            raise ValueError(f"transfer.unfreeze {u!r} is not frozen (transfer.freeze: {freeze}).")


def param_labels(params, tc: TransferConfig) -> Any:
    """A tree like `params` of 'head', 'backbone', 'frozen' or 'late' (see the module docstring)."""
    head = expand(tc.head, params, (), "head")
    freeze = expand(tc.freeze, params, head, "freeze")
    unfreeze = expand(tc.unfreeze, params, head, "unfreeze")

    def label(path, _):
        path = tuple(convert.path_name(path).split("/"))
        if is_frozen(path, head):
            return "head"
        if is_frozen(path, freeze):
            return "late" if is_frozen(path, unfreeze) else "frozen"
        return "backbone"

    return jax.tree_util.tree_map_with_path(label, params)


def frozen_at(tc: TransferConfig, params, epoch: int) -> tuple[str, ...]:
    """The prefixes frozen during `epoch` (1-based): transfer.freeze, less transfer.unfreeze after K."""
    if not tc.freeze:
        return ()
    head = expand(tc.head, params, (), "head")
    freeze = expand(tc.freeze, params, head, "freeze")
    if tc.unfreeze and epoch > tc.unfreeze_after_epochs:
        unfreeze = expand(tc.unfreeze, params, head, "unfreeze")
        freeze = tuple(f for f in freeze if not is_frozen(tuple(f.split("/")), unfreeze))
    return freeze


# ---------------------------------------------------------------------------------------------
# The optimizer and the model of an epoch
# ---------------------------------------------------------------------------------------------

class TransferPlan(NamedTuple):
    """What transfer learning changes in a run's build: the optimizer's parameter groups and the
    model of each epoch (`models[epoch - 1]`)."""

    groups: ParamGroups
    models: tuple[nn.Module, ...]


def plan(cfg: Config, model: nn.Module, variables: dict[str, Any], steps_per_epoch: int
         ) -> TransferPlan:
    """The transfer settings applied to `model` (`variables`: its variables or their shapes):
    checked against its parameters, a bad prefix or a contradiction refused here."""
    groups = parameter_groups(cfg, steps_per_epoch)
    check_transfer(cfg.transfer, variables["params"])
    return TransferPlan(groups, tuple(model_for_epoch(model, cfg.transfer, variables, epoch)
                                      for epoch in range(1, cfg.train.epochs + 1)))


def parameter_groups(cfg: Config, steps_per_epoch: int) -> ParamGroups:
    """The groups 'head', 'backbone', 'frozen' and 'late' of the module docstring, labelled from
    the parameters when the optimizer is initialized."""
    tc = cfg.transfer
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    return ParamGroups(functools.partial(_labels, tc),
                       {"head": 1.0, "backbone": tc.backbone_lr_scale, "frozen": 0.0,
                        "late": tc.backbone_lr_scale},
                       {"late": tc.unfreeze_after_epochs * steps_per_epoch})


def _labels(tc: TransferConfig, params) -> Any:
    check_transfer(tc, params)
    return param_labels(params, tc)


def model_for_epoch(model: nn.Module, tc: TransferConfig, variables, epoch: int) -> nn.Module:
    """`model` with the batch norm layers frozen during `epoch` held in inference mode;
    `variables` holds its 'params' and 'batch_stats' or their shapes (only paths are read).

    A model without a `frozen` field (SeedCNN) can be frozen only where it has no batch norm.
    """
    frozen = frozen_at(tc, variables["params"], epoch)
    if hasattr(model, "frozen"):
        return model.clone(frozen=frozen)
    stats = [p for p in _paths(variables.get("batch_stats") or {}) if is_frozen(p, frozen)]
    if stats:
        raise ValueError(f"{type(model).__name__} cannot keep frozen batch norm layers in inference "
                         f"mode ({'/'.join(stats[0])} is frozen); use a ResNet, or do not freeze "
                         f"layers with batch norm.")
    return model


# ---------------------------------------------------------------------------------------------
# Loading a backbone
# ---------------------------------------------------------------------------------------------

def run_variables(run_dir: pathlib.Path | str, step: int | None = None) -> dict[str, Any]:
    """{'params', 'batch_stats'} (numpy) of a cnnjax run's checkpoint: its best, or `step`.

    Read as stored, without rebuilding the run's optimizer, so a backbone can come from a run of
    any optimizer or class count.
    """
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / checkpoint.CKPT_DIR).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a cnnjax run directory (no {checkpoint.CKPT_DIR}/); "
                                f"transfer.backbone takes a run directory or a {'/'.join(WEIGHT_FILES)} "
                                f"weights file.")
    step = rundir.best_step(run_dir) if step is None else step
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    try:
        step = ckpt.steps()[-1] if step is None and ckpt.steps() else step
        if step not in ckpt.steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory}; available "
                                    f"steps: {ckpt.steps()}.")
        state = ckpt.restore_as_stored(step)
    finally:
        ckpt.close()
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {}) or {}}


def graft(source: dict[str, Any], template: dict[str, Any], keep: Sequence[str] = (),
          source_name: str = "backbone") -> dict[str, Any]:
    """`template`'s variables with every leaf outside `keep` taken from `source`, shapes checked.

    Raises ValueError listing every path missing from `source`, of another shape, or in `source`
    and not in the model (module paths under `keep`, the head, are exempt).
    """
    keep = tuple(keep)
    outside = lambda d: {k: v for k, v in checkpoint.shapes(d).items()
                         if not is_frozen(tuple(k.split("/")[1:]), keep)}
    problems = checkpoint.shape_mismatches(outside(source), outside(template))
    if problems:
        raise ValueError(f"{source_name} does not fit the model ({len(problems)} problems):\n"
                         + "\n".join(problems).replace("checkpoint", "backbone")
                         + f"\nBuild the model with the backbone run's model settings (its "
                         f"config.json); the head {keep} is initialized afresh.")
    src = _flat(source)

    def take(path, leaf):
        name = convert.path_name(path)
        return leaf if is_frozen(tuple(name.split("/")[1:]), keep) else np.asarray(src[name])

    return jax.tree_util.tree_map_with_path(take, template,
                                            is_leaf=lambda x: hasattr(x, "shape"))


def _flat(tree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {convert.path_name(p): leaf for p, leaf in flat}


def load_backbone(source: pathlib.Path | str, template: dict[str, Any], *, head: Sequence[str] = ("fc",),
                  step: int | None = None, gray_stem: str | None = None) -> dict[str, Any]:
    """The model's variables (`template`: {'params', 'batch_stats'}, initialized) with everything
    outside `head` loaded from `source`: a torchvision-layout weights file or a cnnjax run dir."""
    path = pathlib.Path(source)
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    if path.suffix in WEIGHT_FILES:
        return convert.load_torch_weights(path, template, keep=head, gray_stem=gray_stem)
    if not path.exists():
        raise FileNotFoundError(f"transfer.backbone {source} does not exist; give a cnnjax run "
                                f"directory or a {'/'.join(WEIGHT_FILES)} weights file.")
    return graft(run_variables(path, step), template, head, source_name=str(path))


def initialize(state, cfg: Config, model: nn.Module):
    """`state` with its params and batch_stats loaded from `cfg.transfer.backbone`, head kept.

    The optimizer state is left as initialized: it holds no function of the parameter values
    (zero moments, counts), so it need not be rebuilt.
    """
    tc = cfg.transfer
    # RGB kernels are summed into a ResNet's 1-channel stem (model.kwargs.grayscale=stem)
    gray_stem = "conv1" if isinstance(model, ResNet) and model.grayscale == "stem" else None
    variables = load_backbone(tc.backbone, {"params": state.params, "batch_stats": state.batch_stats},
                              head=tc.head, step=tc.step, gray_stem=gray_stem)
    as_jax = functools.partial(jax.tree.map, jax.numpy.asarray)
    return state.replace(params=as_jax(variables["params"]),
                         batch_stats=as_jax(variables["batch_stats"]))
