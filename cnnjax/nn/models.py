"""Models as pure Flax Linen modules.

`SeedCNN` is the classic MNIST network of the seed program: conv 32 -> pool -> conv 64 -> pool ->
dense 128 -> dense 10, initialized as the seed does (conv kernels N(0, 0.01), dense Xavier-uniform,
biases 0). Each block's output is sown into the 'intermediates' collection as conv1_out (after
ReLU), pool1_out, ..., fc1_out, so feature maps can be read with `mutable=['intermediates']` without
editing the model (a sown name may not repeat a submodule's, hence the suffix).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

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


MODELS = {"seed_cnn": SeedCNN, **{name: preset for name, (preset, _) in RESNETS.items()}}

# A tiny variant for fast tests: same structure, a fraction of the width.
TinySeedCNN = functools.partial(SeedCNN, features=(4, 8), dense=(16,))


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a config names, with geometry checked against nothing yet (see `check_geometry`)."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; known models: {', '.join(sorted(MODELS))}.")
    if cfg.name in RESNETS:
        preset, width = RESNETS[cfg.name]
        model = preset(num_classes=num_classes, width=width if cfg.width is None else cfg.width,
                       stem=cfg.stem, grayscale=cfg.grayscale, bn_momentum=cfg.bn_momentum)
        model.check()  # a bad stem or grayscale option fails here, before any compile
        if cfg.conv_lowering != "auto":
            raise ValueError(f"model.conv_lowering={cfg.conv_lowering!r} applies to seed_cnn's "
                             f"convolutions only; leave it 'auto' for {cfg.name}.")
        return model
    if cfg.pool not in POOLS:
        raise ValueError(f"model.pool must be one of {sorted(POOLS)}, got {cfg.pool!r}.")
    layer_specs(cfg.conv_lowering, len(cfg.features))  # a wrong count fails here, before any compile
    if any(width <= 0 for width in cfg.dense):
        raise ValueError(f"model.dense must list positive layer widths (or nothing), got "
                         f"{list(cfg.dense)}; e.g. model.dense=128.")
    return MODELS[cfg.name](
        num_classes=num_classes, features=tuple(cfg.features), kernel_size=cfg.kernel_size,
        stride=cfg.stride, padding=cfg.padding, pool=cfg.pool, pool_size=cfg.pool_size,
        pool_stride=cfg.pool_stride, dense=tuple(cfg.dense), dropout=cfg.dropout,
        conv_dropout=cfg.conv_dropout, batch_norm=cfg.batch_norm, bn_momentum=cfg.bn_momentum,
        conv_lowering=cfg.conv_lowering)


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
