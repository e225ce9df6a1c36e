"""2-D convolution with bias whose kernel and bias gradients are cheap for thin inputs.

Forward and input gradient are XLA's NHWC/HWIO convolutions, exactly as `nn.Conv` lowers them. For
layers with few input taps (kh*kw*in <= TAPS_MAX: the first layer on 1- or 3-channel images) a
`custom_vjp` computes the kernel and bias gradients as one matrix product, [patches, 1]^T @ g. Autodiff
instead feeds a weight-gradient convolution through two transposes of the full-resolution
gradient and sums the bias gradient in a separate tree reduction; on XLA:CPU that was 5-10% of the
seed CNN's train step (docs/performance.md). Wider layers take autodiff's gradients unchanged. The
results equal autodiff's up to float rounding (tests/test_conv.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

TAPS_MAX = 32
_DN = ("NHWC", "HWIO", "NHWC")

Pads = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _patches(x, kernel_hw, strides, padding, out_hw) -> jax.Array:
    """(M, kh*kw*in) input patches, columns in the kernel's HWI order, M = N*out_h*out_w."""
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
    taps = [xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


def _conv_bias(x, kernel, bias, strides, padding):
    return _conv(x, kernel, strides, padding) + bias


def _conv_bias_fwd(x, kernel, bias, strides, padding):
    return _conv(x, kernel, strides, padding) + bias, (x, kernel)


def _conv_bias_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    kh, kw, _, cout = kernel.shape
    dx = jax.vjp(lambda x_: _conv(x_, kernel, strides, padding), x)[1](g)[0]
    patches = _patches(x, (kh, kw), strides, padding, g.shape[1:3])
    ones = jnp.ones((patches.shape[0], 1), patches.dtype)
    grads = jnp.concatenate([patches, ones], axis=1).T @ g.reshape(-1, cout)
    return dx, grads[:-1].reshape(kernel.shape), grads[-1]


_conv_bias = jax.custom_vjp(_conv_bias, nondiff_argnums=(3, 4))
_conv_bias.defvjp(_conv_bias_fwd, _conv_bias_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, strides: tuple[int, int],
           padding: Pads) -> jax.Array:
    """NHWC x HWIO (+ bias) -> NHWC; `padding` is explicit ((top, bottom), (left, right))."""
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d expects NHWC input and an HWIO kernel with matching channels, "
                         f"got shapes {x.shape} and {kernel.shape}.")
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    kh, kw, cin, _ = kernel.shape
    if kh * kw * cin > TAPS_MAX:
        y = _conv(x, kernel, strides, padding)
        return y if bias is None else y + bias
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), x.dtype)  # its gradient is computed, then dropped
    return _conv_bias(x, kernel, bias, strides, padding)


class Conv(nn.Module):
    """`nn.Conv` for NHWC input on `conv2d`: the same params ('kernel' (kh, kw, in, out), 'bias'),
    created in the same order, so the same key gives the same values."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Pads = ((0, 0), (0, 0))
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init,
                            (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
        bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.Conv: f64 in, f64 out
        return conv2d(x, kernel, bias, (self.strides, self.strides), self.padding)
