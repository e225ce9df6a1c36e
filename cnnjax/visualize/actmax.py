"""Activation maximization: the input that drives one channel (or class logit) hardest.

Gradient ascent on the image, from a seeded start, of a channel's mean activation minus an L2 and
a total-variation penalty, with a random shift (jitter) of the image at every step; without the
penalties and the jitter the ascent finds high-frequency patterns no digit contains. Pixels are
kept in the dataset's range. All channels of a layer are optimized at once: one `vmap` over
channels around a `lax.scan` over steps, one compiled program. Weights are shared across the vmap,
so the convolutions stay ordinary batched ones (vmap over weights would turn them into slow
grouped convolutions).

The target is the layer's output as the module returns it; for a conv that is the pre-activation,
so by default the measure is its rectified mean (what a following ReLU passes on; a zero-sum edge
filter's raw mean barely moves with the image). A channel that fires nowhere has no gradient
there, so until it fires its pre-activation is ascended instead. Class logits are not rectified.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cnnjax.nn.capture import LOGITS, list_layers, run_layers
from cnnjax.visualize.feature_maps import colorize, tile


@dataclasses.dataclass(frozen=True)
class ActMaxConfig:
    """Ascent settings; penalties are per-pixel means, so they do not grow with the image."""

    steps: int = 256
    learning_rate: float = 0.05  # Adam, in normalized pixel units
    l2: float = 1e-2
    tv: float = 1e-1
    jitter: int = 2  # the image is rolled by up to this many pixels per axis each step
    start_pixel: float | None = None  # start image's grey level in [0, 1]; None: the dataset mean
    init_scale: float = 0.1  # std of the seeded noise added to the start
    rectify: bool = True  # maximize mean(max(out, 0)), what a ReLU after the layer passes on

    def __post_init__(self):
        for name in ("steps", "learning_rate", "init_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"actmax {name} must be positive, got {getattr(self, name)}.")
        for name in ("l2", "tv", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"actmax {name} must be non-negative, got {getattr(self, name)}.")
        if self.start_pixel is not None and not 0.0 <= self.start_pixel <= 1.0:
            raise ValueError(f"actmax start_pixel is a grey level in [0, 1] (or None for the "
                             f"dataset mean), got {self.start_pixel}.")


@dataclasses.dataclass(frozen=True)
class ActMaxResult:
    """Images (K, H, W, C) in model space, and each target's mean activation at start and end."""

    layer: str
    channels: np.ndarray
    images: np.ndarray
    start: np.ndarray
    final: np.ndarray
    bounds: tuple[float, float]  # the pixel range the images were kept in


def total_variation(x: jax.Array) -> jax.Array:
    """Mean absolute difference between neighbouring pixels of an (H, W, C) image."""
    return jnp.abs(jnp.diff(x, axis=0)).mean() + jnp.abs(jnp.diff(x, axis=1)).mean()


def _channel(model, variables, layer: str, x: jax.Array, channel: jax.Array) -> jax.Array:
    """`channel` of `layer`'s output for one (H, W, C) image: (H, W) for a map, () for a unit."""
    logits, outputs = run_layers(model, variables, x[None])
    out = logits if layer == LOGITS else outputs[layer]
    return jnp.take(out[0], channel, axis=-1)


def _measure(out: jax.Array, rectify: bool) -> jax.Array:
    """The activation reported and maximized: the mean response, rectified if asked."""
    return jnp.maximum(out, 0.0).mean() if rectify else out.mean()


def _objective(out: jax.Array, rectify: bool) -> jax.Array:
    """What is ascended: the measure, except that a rectified channel silent everywhere (zero
    gradient) has its pre-activation pushed up until it fires somewhere."""
    if not rectify:
        return out.mean()
    return jnp.where(jnp.any(out > 0), jnp.maximum(out, 0.0).mean(), out.mean())


@functools.partial(jax.jit, static_argnames=("model", "layer", "cfg", "bounds", "image_shape"))
def _ascend_all(variables, channels, keys, *, model, layer, cfg, bounds, image_shape):
    rectify = cfg.rectify and layer != LOGITS

    def one(channel, key):
        lo, hi = bounds
        start_key, steps_key = jax.random.split(key)
        grey = 0.0 if cfg.start_pixel is None else lo + cfg.start_pixel * (hi - lo)
        x0 = jnp.clip(grey + cfg.init_scale * jax.random.normal(start_key, image_shape), lo, hi)
        tx = optax.adam(cfg.learning_rate)

        def ascent_objective(x, shift):
            out = _channel(model, variables, layer, jnp.roll(x, shift, axis=(0, 1)), channel)
            return (_objective(out, rectify) - cfg.l2 * jnp.mean(x ** 2)
                    - cfg.tv * total_variation(x))

        def step(carry, i):
            x, opt_state = carry
            shift = jax.random.randint(jax.random.fold_in(steps_key, i), (2,), -cfg.jitter,
                                       cfg.jitter + 1)
            grad = jax.grad(ascent_objective)(x, shift)
            updates, opt_state = tx.update(-grad, opt_state, x)  # optax descends: negate to ascend
            return (jnp.clip(optax.apply_updates(x, updates), lo, hi), opt_state), None

        (x, _), _ = lax.scan(step, (x0, tx.init(x0)), jnp.arange(cfg.steps))
        def measure(img):
            return _measure(_channel(model, variables, layer, img, channel), rectify)

        return x, measure(x0), measure(x)

    return jax.vmap(one)(channels, keys)


def activation_maximization(model: nn.Module, variables: Mapping[str, Any], layer: str,
                            image_shape: Sequence[int], key: jax.Array, *,
                            bounds: tuple[float, float],
                            channels: Sequence[int] | None = None,
                            cfg: ActMaxConfig = ActMaxConfig()) -> ActMaxResult:
    """Maximizes each of `channels` of `layer` (all of them by default; 'logits' for classes).

    `bounds` is the pixel range in model space, e.g. ((0 - mean) / std, (1 - mean) / std); `key`
    seeds the starts and the jitter, one stream per channel id, so a channel's result does not
    depend on which others are optimized with it.
    """
    image_shape = tuple(int(s) for s in image_shape)
    layers = {l.name: l for l in list_layers(model, variables, image_shape)}
    if layer not in layers:
        raise ValueError(f"no layer named {layer!r} to maximize; layers: {', '.join(layers)}.")
    width = layers[layer].shape[-1]
    channels = np.arange(width) if channels is None else np.asarray(channels, np.int32)
    if channels.ndim != 1 or len(channels) == 0 or channels.min() < 0 or channels.max() >= width:
        raise ValueError(f"channels of {layer!r} must be a non-empty list in [0, {width}), got "
                         f"{channels.tolist()}.")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}.")
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(channels))  # one per channel id
    images, start, final = _ascend_all(variables, jnp.asarray(channels), keys, model=model,
                                       layer=layer, cfg=cfg, bounds=(lo, hi), image_shape=image_shape)
    return ActMaxResult(layer=layer, channels=channels, images=np.asarray(images),
                        start=np.asarray(start), final=np.asarray(final), bounds=(lo, hi))


def actmax_grid(result: ActMaxResult, cmap: str = "gray") -> np.ndarray:
    """The optimized images as one RGBA grid on the pixel range they were kept in (a saturated
    tile is a real saturated image); tile k is `result.channels[k]`, row-major. Colour images
    show as their channel mean."""
    lo, hi = result.bounds
    stacked = np.moveaxis(result.images.mean(axis=-1), 0, -1)  # (H, W, K)
    return colorize(tile((stacked - lo) / (hi - lo)), cmap, gap=0.5)  # grey gaps: white tiles show
