"""The ResNet family (BasicBlock: ResNet-18, ResNet-34) as Flax Linen modules, in torchvision's layout.

Submodules carry torchvision's names, so a torch `state_dict` key maps onto a Flax path mechanically
(`layer2.0.downsample.1.running_var` is batch_stats/layer2/0/downsample/1/var; `cnnjax/convert.py`):

    conv1 (7x7/2, pad 3) -> bn1 -> ReLU -> max-pool 3x3/2 pad 1      stem='imagenet' (torchvision)
    conv1 (3x3/1, pad 1) -> bn1 -> ReLU                              stem='small' (28-32 px images)
    layer1 .. layer4: BasicBlocks, width * (1, 2, 4, 8) channels, stride 2 from layer2 on
    global average pool -> fc

Convolutions have no bias and are initialized as torchvision does (Kaiming normal, fan_out, ReLU);
BN starts at scale 1, bias 0, epsilon 1e-5; Flax's `bn_momentum=0.9` is torch's momentum 0.1.
`fc` gets torch's default Linear kernel init (uniform +-1/sqrt(fan_in)) and a zero bias.

Grayscale input (C = 1) is either repeated to 3 channels before the stem (`grayscale='repeat'`: RGB
weights load unchanged) or fed to a 1-channel `conv1` (`grayscale='stem'`: a third of the stem's
multiply-adds; RGB weights load by summing the kernel over its input channels, which is exactly the
same function on a gray image).

Freezing: `frozen` holds parameter-path prefixes relative to the ResNet ('layer1', 'layer4/1/bn2';
'' is the whole model), each module handing its children the part below them. Batch norm layers
under a frozen prefix stay in inference mode even with `train=True`, so their running statistics
never move. When the frozen modules cover a prefix of the forward pass (conv1, bn1, layer1, ...),
the activations leaving it are wrapped in `stop_gradient`: the optimizer throws those gradients
away anyway (`cnnjax/transfer.py`), and not computing them makes a frozen-backbone step cost
little more than a forward pass.

Each stage's output is sown into 'intermediates' as stem_out, layer1_out, ..., features (the pooled
vector the head reads), readable with `mutable=['intermediates']`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.nn.geometry import output_shape
from cnnjax.nn.layers import global_avg_pool, max_pool


# Both initializers draw a flat vector and reshape it. Same distribution as flax's variance_scaling;
# the reason is compile time: XLA:CPU compiles the (partitionable) threefry draw of a 4-d shape in
# 1.4-3.7 s per distinct kernel shape and a 1-d one in 0.4 s (measured on 2 busy cores), which
# took ResNet init from 24 s to 5 s.

def conv_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (kh kw out))."""
    fan_out = shape[0] * shape[1] * shape[3]
    flat = jax.random.normal(key, (math.prod(shape),), dtype)
    return (flat * math.sqrt(2.0 / fan_out)).reshape(shape)


def fc_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)


STEMS = ("imagenet", "small")
GRAYSCALE = ("repeat", "stem")


def is_frozen(path: Sequence[str], frozen: Sequence[str]) -> bool:
    """True when a prefix in `frozen` ('layer1', 'layer4/1'; '' is everything) covers `path`."""
    for prefix in frozen:
        parts = tuple(prefix.split("/")) if prefix else ()
        if tuple(path[:len(parts)]) == parts:
            return True
    return False


def frozen_within(frozen: Sequence[str], name: str) -> tuple[str, ...]:
    """The prefixes of `frozen` seen from inside submodule `name` ('layer1/0' -> '0', 'layer1' -> '')."""
    inner = []
    for prefix in frozen:
        head, _, rest = prefix.partition("/")
        if not prefix or head == name:
            inner.append(rest if prefix else "")
    return tuple(inner)


def _conv(features: int, kernel: int, stride: int, padding: int, name: str) -> nn.Conv:
    # Explicit symmetric padding, as torch: 'SAME' would pad a stride-2 conv of an even input
    # (0, 1) instead of (1, 1) and shift every feature map by a pixel.
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=[(padding, padding)] * 2,
                   use_bias=False, kernel_init=conv_init, name=name)


def _norm(name: str, train: bool, frozen: Sequence[str], momentum: float) -> nn.BatchNorm:
    """Batch norm in inference mode when evaluating or when `frozen` (relative to its parent) covers it."""
    return nn.BatchNorm(use_running_average=not train or is_frozen((name,), frozen),
                        momentum=momentum, epsilon=1e-5, name=name)


class Downsample(nn.Module):
    """The shortcut of a block that changes shape: '0' conv 1x1/stride, '1' BN (torchvision's names)."""

    features: int
    strides: int
    frozen: Sequence[str] = ()
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, 1, self.strides, 0, "0")(x)
        return _norm("1", train, self.frozen, self.bn_momentum)(x)


class BasicBlock(nn.Module):
    """conv 3x3/stride -> BN -> ReLU -> conv 3x3 -> BN, plus the shortcut, then ReLU."""

    features: int
    strides: int = 1
    frozen: Sequence[str] = ()
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = functools.partial(_norm, train=train, frozen=self.frozen, momentum=self.bn_momentum)
        shortcut = x
        y = nn.relu(norm("bn1")(_conv(self.features, 3, self.strides, 1, "conv1")(x)))
        y = norm("bn2")(_conv(self.features, 3, 1, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = Downsample(self.features, self.strides,
                                  frozen_within(self.frozen, "downsample"), self.bn_momentum,
                                  name="downsample")(x, train)
        return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
    """`num_blocks` BasicBlocks named '0', '1', ...; the first one carries the stride."""

    num_blocks: int
    features: int
    strides: int
    frozen: Sequence[str] = ()
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            x = BasicBlock(self.features, self.strides if i == 0 else 1,
                           frozen_within(self.frozen, str(i)), self.bn_momentum, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """(N, H, W, C) float images, C = 1 or 3 -> (N, num_classes) logits; see the module docstring."""

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: int = 64
    stem: str = "imagenet"
    grayscale: str = "repeat"
    bn_momentum: float = 0.9
    frozen: Sequence[str] = ()

    def check(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {self.stem!r}.")
        if self.grayscale not in GRAYSCALE:
            raise ValueError(f"ResNet grayscale must be one of {GRAYSCALE}, got {self.grayscale!r}.")
        if not self.stage_sizes or any(n < 1 for n in self.stage_sizes) or self.width < 1:
            raise ValueError(f"ResNet needs stage sizes >= 1 and width >= 1, got stage_sizes="
                             f"{tuple(self.stage_sizes)}, width={self.width}.")

    def feature_shape(self, image_hw: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) of the last stage's output; raises ValueError naming a layer that cannot fit."""
        self.check()
        hw = tuple(image_hw)
        if self.stem == "imagenet":
            hw = output_shape(hw, 7, 2, 3, "conv1")
            hw = output_shape(hw, 3, 2, 1, "maxpool")
        for i in range(1, len(self.stage_sizes)):
            hw = output_shape(hw, 3, 2, 1, f"layer{i + 1}")
        return (*hw, self.width * 2 ** (len(self.stage_sizes) - 1))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, example_ids: jax.Array | None = None
                 ) -> jax.Array:
        """`train` switches unfrozen batch norm layers to batch statistics ('batch_stats' mutable).

        `example_ids` is accepted for the train step's calling convention; ResNet draws nothing.
        """
        del example_ids
        self.check()
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"ResNet expects NHWC images with 1 or 3 channels, got shape {x.shape}.")
        if x.shape[-1] == 1 and self.grayscale == "repeat":
            x = jnp.repeat(x, 3, axis=-1)
        frozen = tuple(self.frozen)
        # The forward pass up to here runs in a frozen prefix while every module so far is frozen.
        in_frozen_prefix = is_frozen(("conv1",), frozen) and is_frozen(("bn1",), frozen)
        bn = functools.partial(_norm, train=train, frozen=frozen, momentum=self.bn_momentum)
        if self.stem == "imagenet":
            x = nn.relu(bn("bn1")(_conv(self.width, 7, 2, 3, "conv1")(x)))
            x = max_pool(x, 3, 2, 1, layer="maxpool")
        else:
            x = nn.relu(bn("bn1")(_conv(self.width, 3, 1, 1, "conv1")(x)))
        if in_frozen_prefix:
            x = jax.lax.stop_gradient(x)
        self.sow("intermediates", "stem_out", x)
        for i, num_blocks in enumerate(self.stage_sizes):
            name = f"layer{i + 1}"
            x = ResNetStage(num_blocks, self.width * 2 ** i, 1 if i == 0 else 2,
                            frozen_within(frozen, name), self.bn_momentum, name=name)(x, train)
            in_frozen_prefix = in_frozen_prefix and is_frozen((name,), frozen)
            if in_frozen_prefix:
                x = jax.lax.stop_gradient(x)
            self.sow("intermediates", f"{name}_out", x)
        x = global_avg_pool(x)
        self.sow("intermediates", "features", x)
        return nn.Dense(self.num_classes, kernel_init=fc_init, bias_init=nn.initializers.zeros,
                        name="fc")(x)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
