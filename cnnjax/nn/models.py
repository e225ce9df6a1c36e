"""Models as pure Flax Linen modules.

`SeedCNN` is the classic MNIST network of the seed program: conv 32 -> pool -> conv 64 -> pool ->
dense 128 -> dense 10, initialized as the seed does (conv kernels N(0, 0.01), dense Xavier-uniform,
biases 0). Each block's output is sown into the 'intermediates' collection as conv1_out (after
ReLU), pool1_out, ..., fc1_out, so feature maps can be read with `mutable=['intermediates']` without
editing the model (a sown name may not repeat a submodule's, hence the suffix).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from cnnjax import imports
from cnnjax.config import ModelConfig
from cnnjax.nn.conv import Conv, layer_specs
from cnnjax.nn.geometry import Padding, explicit_padding, output_shape
from cnnjax.nn.layers import POOLS, ExampleDropout, Pool, flatten
from cnnjax.nn.resnet import RESNETS

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

    def feature_shape(self, image_hw: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) after the last pool, from the output-size arithmetic; raises on bad geometry."""
        if not self.features or any(not isinstance(f, int) or f <= 0 for f in self.features):
            raise ValueError(f"model.features must list one positive conv width per block, got "
                             f"{list(self.features)}; e.g. model.features=32,64.")
        hw = tuple(image_hw)
        for i, _ in enumerate(self.features, start=1):
            conv_in = hw
            hw = output_shape(hw, self.kernel_size, self.stride, self.padding, f"conv{i}")
            try:
                hw = output_shape(hw, self.pool_size, self.pool_stride or self.pool_size, 0, f"pool{i}")
            except ValueError as err:
                if hw == conv_in:
                    raise
                raise ValueError(f"conv{i} (model.kernel_size={self.kernel_size}, model.stride="
                                 f"{self.stride}, model.padding={self.padding!r}) shrinks "
                                 f"{conv_in[0]}x{conv_in[1]} to {hw[0]}x{hw[1]}, too small for "
                                 f"pool{i}'s window {self.pool_size}: use a smaller "
                                 f"model.kernel_size or model.stride, more model.padding, fewer "
                                 f"model.features, or a smaller model.pool_size.") from err
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


# Name -> the module class (or preset) it builds. Built-ins and users' models share it: a model
# registered with `@register_model("name")` or named by an import path `package.module:Name` is
# built as `Model(num_classes=..., **model.kwargs)`; seed_cnn and the ResNets read their fields of
# ModelConfig instead.
MODELS = {"seed_cnn": SeedCNN, **{name: preset for name, (preset, _) in RESNETS.items()}}
register_model = imports.registrar(MODELS, "model")


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a config names, with geometry checked against nothing yet (see `check_model`)."""
    factory = imports.lookup(MODELS, cfg.name, "model.name")
    builtin = cfg.name in RESNETS or factory is SeedCNN
    if cfg.kwargs and builtin:
        raise ValueError(f"model.kwargs={cfg.kwargs} is for registered or import-path models; "
                         f"{cfg.name} takes its settings from the model.* fields.")
    if cfg.name in RESNETS:
        preset, width = RESNETS[cfg.name]
        model = preset(num_classes=num_classes, width=width if cfg.width is None else cfg.width,
                       stem=cfg.stem, grayscale=cfg.grayscale, bn_momentum=cfg.bn_momentum)
        model.check()  # a bad stem or grayscale option fails here, before any compile
        if cfg.conv_lowering != "auto":
            raise ValueError(f"model.conv_lowering={cfg.conv_lowering!r} applies to seed_cnn's "
                             f"convolutions only; leave it 'auto' for {cfg.name}.")
        return model
    if not builtin:
        return _build_user_model(cfg, factory, num_classes)
    if cfg.pool not in POOLS:
        raise ValueError(f"model.pool must be one of {sorted(POOLS)}, got {cfg.pool!r}.")
    layer_specs(cfg.conv_lowering, len(cfg.features))  # a wrong count fails here, before any compile
    if any(width <= 0 for width in cfg.dense):
        raise ValueError(f"model.dense must list positive layer widths (or nothing), got "
                         f"{list(cfg.dense)}; e.g. model.dense=128.")
    return SeedCNN(
        num_classes=num_classes, features=tuple(cfg.features), kernel_size=cfg.kernel_size,
        stride=cfg.stride, padding=cfg.padding, pool=cfg.pool, pool_size=cfg.pool_size,
        pool_stride=cfg.pool_stride, dense=tuple(cfg.dense), dropout=cfg.dropout,
        conv_dropout=cfg.conv_dropout, batch_norm=cfg.batch_norm, bn_momentum=cfg.bn_momentum,
        conv_lowering=cfg.conv_lowering)


def _build_user_model(cfg: ModelConfig, factory, num_classes: int) -> nn.Module:
    try:
        model = factory(num_classes=num_classes, **cfg.kwargs)
    except TypeError as err:
        raise ValueError(f"model {cfg.name!r} cannot be built as {_name(factory)}(num_classes="
                         f"{num_classes}, **{cfg.kwargs}): {err}. Give its constructor a "
                         f"`num_classes` field and pass the others in model.kwargs.") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {cfg.name!r} built a {type(model).__name__}, not a flax.linen "
                         f"Module.")
    _check_call_signature(model, cfg.name)
    return model


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
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        if not hasattr(logits, "shape") or tuple(logits.shape) != (1, num_classes):
            raise ValueError(f"model {name!r} ({type(model).__name__}) returns "
                             f"{getattr(logits, 'shape', type(logits).__name__)} for one image; "
                             f"expected logits of shape (1, {num_classes}) ({num_classes} classes).")


def check_geometry(model: nn.Module, image_shape: Sequence[int]) -> None:
    """Raises ValueError naming the layer if `model` cannot run on (H, W, C) images."""
    if hasattr(model, "feature_shape"):
        model.feature_shape(tuple(image_shape)[:2])


def has_batch_stats(model: nn.Module, image_shape: Sequence[int]) -> bool:
    """Whether `model` keeps batch-norm statistics, from its variables' shapes (nothing computed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    return bool(shapes.get("batch_stats"))


def count_params(params) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree_util.tree_leaves(params))
