"""Reading any layer's output, and nudging it, without editing the model.

Every named submodule's `__call__` output is recorded through `flax.linen.intercept_methods`, the
hook Flax's own `capture_intermediates` is built on, but kept in a Python dict rather than the
'intermediates' collection: a model that sows maps under its submodules' names would clash with
it there (Flax reserves one name per scope). Layers are named by module path ('conv2',
'stage4/block1/conv2'), so the same code serves SeedCNN and a ResNet. The hook can also add a
tensor to one layer's output, which is how a gradient with respect to a feature map (Grad-CAM) is
taken without splitting the model.

An activation applied as a function (`nn.relu(x)`) is no module and has no output of its own; the
map it makes is what the next module reads. When asked (`inputs=True`), such an input is recorded
as '<module>:in' (SeedCNN's 'pool2:in' is ReLU(conv2), the rectified map Grad-CAM wants), like a
PyTorch forward-pre-hook; only inputs that no recorded layer produced, after the first layer.

A module that hands back its input object unchanged (dropout at inference) is a pass-through and
is not listed: its map would repeat the one before it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGITS = "logits"  # the model's own output, listed after its layers
INPUT = ":in"  # suffix of a module's recorded input map
NORMS = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One module call: its path, its class, its output shape per example, what it read."""

    name: str
    kind: str
    shape: tuple[int, ...]
    source: str | None  # the layer whose output object it consumed; None: the input or other ops

    @property
    def is_map(self) -> bool:
        """A spatial feature map (H, W, C), as opposed to a vector of units."""
        return len(self.shape) == 3


def inference_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The collections `apply` needs at inference: empty ones (no batch norm) are dropped."""
    return {k: v for k, v in variables.items() if jax.tree_util.tree_leaves(v)}


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    return name


def _interceptor(outputs: dict, kinds: dict, sources: dict, add: Mapping[str, jax.Array],
                 inputs: bool):
    produced: dict[int, str] = {}  # id(output object) -> layer name, to follow who reads whom

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not module.path:
            return next_fun(*args, **kwargs)
        if (inputs and produced and args and getattr(args[0], "ndim", 0) == 4
                and id(args[0]) not in produced):
            name = _unique("/".join(module.path), {k[:-len(INPUT)] for k in outputs
                                                   if k.endswith(INPUT)}) + INPUT
            x = args[0] + add[name] if name in add else args[0]
            args = (x, *args[1:])
            outputs[name], kinds[name], sources[name] = x, "input", None
            produced[id(x)] = name  # a nested module reading the same map does not list it again
        out = next_fun(*args, **kwargs)
        if args and out is args[0]:
            return out
        name = _unique("/".join(module.path), outputs)
        if name in add:
            out = out + add[name]
        outputs[name] = out
        kinds[name] = type(module).__name__
        sources[name] = produced.get(id(args[0])) if args else None
        produced[id(out)] = name
        return out

    return intercept


def run_layers(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
               add: Mapping[str, jax.Array] | None = None, inputs: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits, {layer: output}) for float model-space images (N, H, W, C).

    `add` maps layer names to tensors added to those layers' outputs before the rest of the model
    reads them; a gradient with respect to an added zero tensor is the gradient with respect to
    that layer's output. `inputs` also records the '<module>:in' maps (implied by such a name in
    `add`). Pure: jit and grad go through it.
    """
    add = dict(add or {})
    inputs = inputs or any(n.endswith(INPUT) for n in add)
    outputs, kinds, sources = {}, {}, {}
    with nn.intercept_methods(_interceptor(outputs, kinds, sources, add, inputs)):
        logits = model.apply(inference_variables(variables), images)
    missing = sorted(set(add) - set(outputs))
    if missing:
        raise ValueError(_unknown(missing, model, outputs))
    return logits, outputs


def list_layers(model: nn.Module, variables: Mapping[str, Any], image_shape: Sequence[int],
                inputs: bool = False) -> list[Layer]:
    """The model's layers in call order, from shapes alone (no arithmetic is run), then 'logits';
    with `inputs`, the '<module>:in' maps too, each just before its module."""
    outputs, kinds, sources = {}, {}, {}

    def trace(v, x):
        with nn.intercept_methods(_interceptor(outputs, kinds, sources, {}, inputs)):
            return model.apply(inference_variables(v), x)

    logits = jax.eval_shape(trace, variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    layers = [Layer(name, kinds[name], tuple(out.shape[1:]), sources[name])
              for name, out in outputs.items()]
    last = layers[-1].name if layers else None
    return layers + [Layer(LOGITS, "output", tuple(logits.shape[1:]), last)]


def capture(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
            names: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """{layer: output} for float model-space images; all layers and 'logits' when `names` is None
    ('<module>:in' maps only when named)."""
    inputs = names is not None and any(n.endswith(INPUT) for n in names)
    logits, outputs = run_layers(model, variables, images, inputs=inputs)
    outputs[LOGITS] = logits
    if names is None:
        return outputs
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(_unknown(missing, model, outputs))
    return {n: outputs[n] for n in names}


def _unknown(missing: Sequence[str], model: nn.Module, outputs: Mapping[str, Any]) -> str:
    return (f"no layer named {', '.join(map(repr, missing))} in {type(model).__name__}; its layers "
            f"are {', '.join(outputs)} (module paths joined by '/', a module's input map as "
            f"'<module>{INPUT}'; pass-through modules such as dropout at inference are not listed).")


def conv_layers(layers: Sequence[Layer]) -> list[Layer]:
    """Convolutions (any module class whose name contains 'Conv') with a spatial output."""
    return [l for l in layers if "Conv" in l.kind and l.is_map]


def top_level(layers: Sequence[Layer]) -> list[Layer]:
    """Spatial layers that are direct children of the model: SeedCNN's conv1 .. pool2, a ResNet's
    conv1, bn1, layer1 .. layer4; the hierarchy at a glance, without every block's insides."""
    return [l for l in layers if l.is_map and "/" not in l.name]


def last_feature_layer(layers: Sequence[Layer]) -> str | None:
    """The deepest top-level spatial layer that is not a pool: SeedCNN's conv2, a ResNet's layer4.

    Grad-CAM's usual layer (pytorch-grad-cam uses `model.layer4[-1]` for ResNets), and the default
    act-max target; a pool after it only coarsens the same channels.
    """
    candidates = [l.name for l in top_level(layers) if "Pool" not in l.kind]
    return candidates[-1] if candidates else None


def preactivation(layers: Sequence[Layer], conv: str) -> Layer:
    """The map a conv's nonlinearity reads: the conv's output, or a norm layer's applied directly to it.

    conv -> BatchNorm -> ReLU is the usual block; a filter is dead when this map is <= 0 everywhere.
    """
    by_name = {l.name: l for l in layers}
    if conv not in by_name:
        raise ValueError(f"no layer named {conv!r}; layers: {', '.join(by_name)}.")
    current = by_name[conv]
    while True:
        nxt = next((l for l in layers if l.source == current.name and l.kind in NORMS), None)
        if nxt is None:
            return current
        current = nxt


def rectified_feature_layer(layers: Sequence[Layer]) -> str | None:
    """Grad-CAM's default: the last feature layer's rectified map, as the Grad-CAM paper and
    pytorch-grad-cam take it (after the ReLU, e.g. a ResNet's `layer4[-1]`).

    `layers` must be listed with `inputs=True`. When the entry right after the last feature layer
    is a module's input of the same shape, an activation function sits between them: SeedCNN's
    'pool2:in' = ReLU(conv2). Otherwise the layer's own output is taken (a ResNet block ends in
    its ReLU).
    """
    plain = [l for l in layers if l.kind != "input"]
    last = last_feature_layer(plain)
    if last is None:
        return None
    names = [l.name for l in layers]
    after = layers[names.index(last) + 1] if names.index(last) + 1 < len(layers) else None
    shape = layers[names.index(last)].shape
    return after.name if after is not None and after.kind == "input" and after.shape == shape else last
