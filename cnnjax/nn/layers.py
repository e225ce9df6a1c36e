"""Pooling as pure functions, plus thin Flax modules over them.

All functions take NHWC arrays. Non-overlapping windows (stride == window, the CNN default) take a
pad-reshape-reduce path: XLA lowers the gradient of a generic `reduce_window` max to
`select_and_scatter`, a single-threaded loop on CPU that dominated the seed CNN's step, while a
plain reduction's gradient is elementwise (for max, written out by hand on the full-resolution
array, which XLA:CPU runs faster than autodiff's 6-D form). Overlapping windows fall back to
`lax.reduce_window`. Windows follow torch's floor mode: a trailing remainder is dropped.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from cnnjax.nn.geometry import Padding, explicit_padding, output_shape


def _pool(x: jax.Array, reduce: str, window: int, stride: int | None, padding: Padding,
          layer: str) -> jax.Array:
    if x.ndim != 4:
        raise ValueError(f"{layer}: expected an NHWC array of rank 4, got shape {x.shape}.")
    stride = window if stride is None else stride
    h, w = x.shape[1:3]
    out_h, out_w = output_shape((h, w), window, stride, padding, layer)
    pads = [explicit_padding(padding, window, stride, s, layer) for s in (h, w)]
    fill = -jnp.inf if reduce == "max" else 0.0
    if stride == window:
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
        x = x[:, :out_h * window, :out_w * window, :]
        if reduce == "max":
            return _window_max(x, window)
        x = x.reshape(x.shape[0], out_h, window, out_w, window, x.shape[-1])
        return x.mean(axis=(2, 4))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    full_pads = ((0, 0), pads[0], pads[1], (0, 0))
    if reduce == "max":
        return lax.reduce_window(x, fill, lax.max, dims, strides, full_pads)
    return lax.reduce_window(x, 0.0, lax.add, dims, strides, full_pads) / (window * window)


def _window_max_fwd_only(x: jax.Array, window: int) -> jax.Array:
    x = x.reshape(x.shape[0], x.shape[1] // window, window, x.shape[2] // window, window, x.shape[3])
    return x.max(axis=(2, 4))


def _upsample(y: jax.Array, window: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(y, window, axis=1), window, axis=2)


def _window_max_fwd(x, window):
    y = _window_max_fwd_only(x, window)
    return y, (x, y)


def _window_max_bwd(window, residuals, g):
    # The same gradient as autodiff of `max` (ties share it equally), written as elementwise ops
    # on the full-resolution array: XLA:CPU's fusion of autodiff's 6-D reshape/broadcast form ran
    # 1.6-2x slower, and several times slower fused with the conv/ReLU before it (performance.md).
    x, y = residuals
    count = sum((x[:, i::window, j::window] == y).astype(g.dtype)
                for i in range(window) for j in range(window))
    return (jnp.where(x == _upsample(y, window), _upsample(g / count, window), 0.0),)


_window_max = jax.custom_vjp(_window_max_fwd_only, nondiff_argnums=(1,))
_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: Padding = 0,
             layer: str = "max_pool") -> jax.Array:
    """Max over `window`×`window` patches; padding counts as -inf, as in torch's MaxPool2d."""
    return _pool(x, "max", window, stride, padding, layer)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: Padding = 0,
             layer: str = "avg_pool") -> jax.Array:
    """Mean over `window`×`window` patches; padded zeros count (torch's count_include_pad=True)."""
    return _pool(x, "avg", window, stride, padding, layer)


def global_max_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C): the strongest response of each channel anywhere in the image."""
    return x.max(axis=(1, 2))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C): each channel's mean response."""
    return x.mean(axis=(1, 2))


POOLS = {"max": max_pool, "avg": avg_pool}


class Pool(nn.Module):
    """A max or average pooling layer; `kind` is 'max' or 'avg'."""

    kind: str = "max"
    window: int = 2
    stride: int | None = None
    padding: Padding = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in POOLS:
            raise ValueError(f"{self.name}: pool kind must be one of {sorted(POOLS)}, got {self.kind!r}.")
        return POOLS[self.kind](x, self.window, self.stride, self.padding, layer=self.name or "pool")


def flatten(x: jax.Array) -> jax.Array:
    """(N, ...) -> (N, features), in NHWC order (torch flattens NCHW: transpose to compare)."""
    return x.reshape(x.shape[0], -1)



@flax.struct.dataclass
class TracedRate:
    """A dropout rate held as an array, so one compiled program serves several rates (the members
    of a `cnnjax sweep` grid). It carries the keep probability 1 - rate, computed in Python's
    double and rounded once to float32, as a constant rate's is: a traced rate draws exactly the
    masks and scales exactly as its constant would. A rate of 0 keeps every unit (the uniform
    draw is below 1)."""

    keep: jax.Array


class ExampleDropout(nn.Module):
    """Dropout whose mask for example i is drawn from fold_in(dropout_key, example_ids[i]).

    Flax's nn.Dropout draws one mask for the whole batch, so an example's mask would change with the
    batch it sits in and the device it lands on; keying each example by its id makes the mask a
    function of (run key, step, example) alone. In training mode a missing 'dropout' key raises
    (flax's InvalidRngError) rather than silently skipping. `rate` is a number or a `TracedRate`.
    """

    rate: float | TracedRate

    @nn.compact
    def __call__(self, x: jax.Array, example_ids: jax.Array | None, deterministic: bool) -> jax.Array:
        traced = isinstance(self.rate, TracedRate)
        if not traced and not 0.0 <= self.rate < 1.0:
            raise ValueError(f"{self.name}: dropout rate must be in [0, 1), got {self.rate}.")
        if deterministic or (not traced and self.rate == 0.0):
            return x
        if example_ids is None:
            raise ValueError(f"{self.name}: training-mode dropout needs example_ids (one int per "
                             f"example) so each example's mask has its own key.")
        keep_probability = self.rate.keep if traced else 1.0 - self.rate
        key = self.make_rng("dropout")
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, keep_probability, x.shape[1:]))(keys)
        scale = keep_probability.astype(x.dtype) if traced else keep_probability
        return jnp.where(keep, x / scale, 0.0)
