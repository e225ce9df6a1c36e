"""Models as pure Flax Linen modules.

`SeedCNN` is the classic MNIST network of the seed program: conv 32 -> pool -> conv 64 -> pool ->
dense 128 -> dense 10, initialized as the seed does (conv kernels N(0, 0.01), dense Xavier-uniform,
biases 0). Each block's output is sown into the 'intermediates' collection as conv1_out (after
ReLU), pool1_out, ..., fc1_out, so feature maps can be read with `mutable=['intermediates']` without
editing the model (a sown name may not repeat a submodule's, hence the suffix).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import typing
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from cnnjax import imports
from cnnjax.config import ModelConfig
from cnnjax.nn.conv import Conv, layer_specs
from cnnjax.nn.geometry import Padding, explicit_padding, output_shape
from cnnjax.nn.layers import POOLS, ExampleDropout, Pool, flatten
from cnnjax.nn.resnet import ResNet18, ResNet34

conv_init = nn.initializers.normal(stddev=0.01)
dense_init = nn.initializers.xavier_uniform()


class SeedCNN(nn.Module):
    """Conv blocks (Conv + ReLU + pool), flatten, hidden Dense + ReLU layers, then the classifier."""

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    stride: int = 1
    padding: Padding = 1
    pool: str = "max"
    pool_size: int = 2
    pool_stride: int | None = None
    dense: Sequence[int] = (128,)
    dropout: float = 0.0
    conv_dropout: float = 0.0
    batch_norm: bool = False
    bn_momentum: float = 0.9
    conv_lowering: str = "auto"  # cnnjax.nn.conv's spec: one for every conv, or one per conv

    def check(self) -> None:
        """Raises ValueError naming the setting (a model.kwargs entry) that cannot build a network."""
        if not self.features or any(not isinstance(f, int) or f <= 0 for f in self.features):
            raise ValueError(f"model.kwargs.features must list one positive conv width per block, "
                             f"got {list(self.features)}; e.g. model.kwargs.features=32,64.")
        if self.pool not in POOLS:
            raise ValueError(f"model.kwargs.pool must be one of {sorted(POOLS)}, got {self.pool!r}.")
        if any(width <= 0 for width in self.dense):
            raise ValueError(f"model.kwargs.dense must list positive layer widths (or nothing), got "
                             f"{list(self.dense)}; e.g. model.kwargs.dense=128.")
        layer_specs(self.conv_lowering, len(self.features))

    def feature_shape(self, image_hw: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) after the last pool, from the output-size arithmetic; raises on bad geometry."""
        self.check()
        hw = tuple(image_hw)
        for i, _ in enumerate(self.features, start=1):
            conv_in = hw
            hw = output_shape(hw, self.kernel_size, self.stride, self.padding, f"conv{i}")
            try:
                hw = output_shape(hw, self.pool_size, self.pool_stride or self.pool_size, 0, f"pool{i}")
            except ValueError as err:
                if hw == conv_in:
                    raise
                raise ValueError(f"conv{i} (kernel_size={self.kernel_size}, stride="
                                 f"{self.stride}, padding={self.padding!r}) shrinks "
                                 f"{conv_in[0]}x{conv_in[1]} to {hw[0]}x{hw[1]}, too small for "
                                 f"pool{i}'s window {self.pool_size}: use a smaller "
                                 f"model.kwargs.kernel_size or stride, more padding, fewer "
                                 f"features, or a smaller pool_size.") from err
        return (*hw, self.features[-1])

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, example_ids: jax.Array | None = None
                 ) -> jax.Array:
        """(N, H, W, C) float images -> (N, num_classes) logits.

        `train` switches dropout on (needs a 'dropout' rng and `example_ids`) and batch norm to batch
        statistics (with 'batch_stats' mutable).
        """
        if x.ndim != 4:
            raise ValueError(f"SeedCNN expects NHWC images of rank 4, got shape {x.shape}.")
        expected = self.feature_shape(x.shape[1:3])
        lowerings = layer_specs(self.conv_lowering, len(self.features))
        for i, width in enumerate(self.features, start=1):
            pads = [explicit_padding(self.padding, self.kernel_size, self.stride, s, f"conv{i}")
                    for s in x.shape[1:3]]
            # conv.Conv: nn.Conv's params and numerics, each pass lowered as measured fastest
            # on XLA:CPU (see cnnjax/nn/conv.py).
            x = Conv(width, (self.kernel_size, self.kernel_size), strides=self.stride,
                     padding=tuple(pads), kernel_init=conv_init, bias_init=nn.initializers.zeros,
                     use_bias=not self.batch_norm, lowering=lowerings[i - 1], name=f"conv{i}")(x)
            if self.batch_norm:
                # No conv bias before BN: BN cancels it, so its gradient is rounding noise that
                # Adam's normalization would amplify into a random walk.
                x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=1e-5, name=f"bn{i}")(x)
            x = nn.relu(x)
            self.sow("intermediates", f"conv{i}_out", x)
            x = Pool(self.pool, self.pool_size, self.pool_stride, 0, name=f"pool{i}")(x)
            self.sow("intermediates", f"pool{i}_out", x)
            x = ExampleDropout(self.conv_dropout, name=f"conv_dropout{i}")(x, example_ids, not train)
        assert x.shape[1:] == expected, (x.shape, expected)
        x = flatten(x)
        for i, width in enumerate(self.dense, start=1):
            x = nn.relu(nn.Dense(width, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                                 name=f"fc{i}")(x))
            self.sow("intermediates", f"fc{i}_out", x)
        x = ExampleDropout(self.dropout, name="dropout")(x, example_ids, not train)
        return nn.Dense(self.num_classes, kernel_init=dense_init, bias_init=nn.initializers.zeros,
                        name=f"fc{len(self.dense) + 1}")(x)


# Name -> the module class (or preset) it builds, cnnjax's own and users' alike: every model is
# built as `Model(num_classes=..., **model.kwargs)`.
MODELS = imports.Registry("model", "model.name")
register_model = MODELS.register
register_model("seed_cnn", SeedCNN)
register_model("resnet18", ResNet18)
register_model("resnet34", ResNet34)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a config names, its own checks passed (geometry comes with `check_model`)."""
    return model_from(MODELS.lookup(cfg.name), cfg, num_classes)


def model_from(factory: Any, cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model `factory` (what `model.name` names in `MODELS`) builds with `model.kwargs`."""
    if not callable(factory):
        raise ValueError(f"model {cfg.name!r} names {imports.kind(factory)}, not a flax.linen "
                         f"Module class or a function building one.")
    kwargs = _typed_kwargs(factory, cfg.kwargs)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {cfg.name!r} cannot be built as {_name(factory)}(num_classes="
                         f"{num_classes}, **{cfg.kwargs}): {err}. Its settings go in model.kwargs "
                         f"(--set model.kwargs.NAME=VALUE); {_fields(factory)}") from None
    except ValueError:  # a model's own check of its settings, naming them
        raise
    except Exception as err:  # the user's factory failed: named with its own line
        raise ValueError(f"model {cfg.name!r}: building it raised {imports.where(err)}"
                         f"{imports.first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {cfg.name!r} built {imports.kind(model)}, not a flax.linen "
                         f"Module.")
    _check_call_signature(model, cfg.name)
    if hasattr(model, "check"):  # a model's own argument checks, before anything is traced
        model.check()
    return model


def _module_class(factory) -> type | None:
    while hasattr(factory, "func"):  # functools.partial presets
        factory = factory.func
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _fields(factory) -> str:
    cls = _module_class(factory)
    if cls is None:
        return "see its signature."
    names = [f.name for f in dataclasses.fields(cls)
             if f.init and f.name not in ("parent", "name", "num_classes")]
    return f"{cls.__name__} takes {', '.join(names)}."


def _typed_kwargs(factory, kwargs: dict) -> dict:
    """JSON's lists as the tuples a module's sequence fields hold (hashable, as Flax wants), and a
    lone number where a sequence is declared as a one-element tuple ('features=32')."""
    cls = _module_class(factory)
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = {}
    for key, value in kwargs.items():
        sequence = typing.get_origin(hints.get(key)) in (tuple, collections.abc.Sequence)
        if isinstance(value, list):
            value = tuple(value)
        elif sequence and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        out[key] = value
    return out


def _name(obj) -> str:
    return getattr(obj, "__qualname__", None) or getattr(getattr(obj, "func", None), "__qualname__",
                                                          repr(obj))


def _call_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(model).__call__).parameters)


def _check_call_signature(model: nn.Module, name: str) -> None:
    """The contract: `__call__(self, x, train=...)`, optionally `example_ids=`."""
    params = _call_parameters(model)
    positional = [p for p in list(params.values())[1:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not positional or ("train" not in params and not takes_kwargs):
        raise ValueError(f"model {name!r} ({type(model).__name__}) has __call__{inspect.signature(type(model).__call__)}; "
                         f"cnnjax calls models as __call__(self, x, train: bool = False) (and "
                         f"passes example_ids= where the signature takes it).")


def accepts_example_ids(model: nn.Module) -> bool:
    """Whether the step should pass each row's example index (per-example dropout keys)."""
    params = _call_parameters(model)
    return "example_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_model(model: nn.Module, image_shape: Sequence[int], num_classes: int, name: str) -> None:
    """Runs the model abstractly (`jax.eval_shape`: nothing is computed or compiled) on one
    (1, H, W, C) image, in training and evaluation mode, and checks it gives (1, num_classes)
    logits; raises ValueError naming the module and what was expected."""
    check_geometry(model, image_shape)
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    extra = {"example_ids": jnp.zeros((1,), jnp.int32)} if accepts_example_ids(model) else {}

    def run(train: bool):
        variables = model.init(keys, jnp.zeros(x.shape, x.dtype), train=False)
        out = model.apply(variables, jnp.zeros(x.shape, x.dtype), train=train,
                          rngs={"dropout": keys["dropout"]}, mutable=["batch_stats"], **extra)
        return out[0] if isinstance(out, tuple) else out

    for train in (False, True):
        try:
            logits = jax.eval_shape(lambda: run(train))
        except Exception as err:  # the user's module: any error is a misfit, reported as one
            raise ValueError(f"model {name!r} ({type(model).__name__}) fails on a batch of "
                             f"(1, {', '.join(map(str, image_shape))}) images with train={train}: "
                             f"{imports.where(err)}{imports.first_line(err)}") from None
        if not hasattr(logits, "shape") or tuple(logits.shape) != (1, num_classes):
            raise ValueError(f"model {name!r} ({type(model).__name__}) returns "
                             f"{getattr(logits, 'shape', type(logits).__name__)} for one image; "
                             f"expected logits of shape (1, {num_classes}) ({num_classes} classes).")


def check_geometry(model: nn.Module, image_shape: Sequence[int]) -> None:
    """Raises ValueError naming the layer if `model` cannot run on (H, W, C) images."""
    if hasattr(model, "feature_shape"):
        model.feature_shape(tuple(image_shape)[:2])


def abstract_variables(model: nn.Module, image_shape: Sequence[int]) -> dict[str, Any]:
    """The shapes of `model`'s variables ('params', and 'batch_stats' where it keeps batch-norm
    statistics) on (H, W, C) images; nothing is computed."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))


def count_params(params) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params))
