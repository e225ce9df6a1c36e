"""Activation maximization: the input that drives one channel (or class logit) hardest.

Gradient ascent as Lucid does it (Olah et al., "Feature Visualization", Distill 2017), because a
plain ascent on pixels, clipped to their range, finds saturated pixel-scale stripes no digit
contains:

- the image is parametrized by its 2-D Fourier spectrum, each frequency f's amplitude scaled by
  1 / f^decay_power (Lucid's `fft_image`): the ascent's steps are decorrelated across pixels and
  low frequencies move first, a frequency prior instead of a penalty;
- a sigmoid maps that to the pixel range [0, 1], so pixels approach the bounds only as the ascent
  insists, never by clipping;
- at every step the image is jittered, scaled and rotated by a random affine (Lucid's transform
  robustness), so a pattern must survive small moves to pay, as a stroke does and a one-pixel
  stripe does not.

All channels of a layer are optimized at once: one `vmap` over channels around a `lax.scan` over
steps, one compiled program. Weights are shared across the vmap, so the convolutions stay ordinary
batched ones (vmap over weights would turn them into slow grouped convolutions).

The target is the layer's output as the module returns it; for a conv that is the pre-activation,
so by default the measure is its rectified mean (what a following ReLU passes on; a zero-sum edge
filter's raw mean barely moves with the image). A channel that fires nowhere has no gradient
there, so until it fires its pre-activation is ascended instead. A class is ascended on its
log-softmax (its logit minus the log-sum of all: more of this class and less of the others); the
reported measure is its logit.
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

from cnnjax.data import augment
from cnnjax.nn.capture import LOGITS, list_layers, run_layers
from cnnjax.visualize.feature_maps import colorize, rgb_grid, tile

Bound = float | tuple[float, ...]  # one pixel-range end for all channels, or one per channel


@dataclasses.dataclass(frozen=True)
class ActMaxConfig:
    """Ascent settings; the transforms' ranges are drawn uniformly each step."""

    steps: int = 256
    learning_rate: float = 0.05  # Adam on the scaled spectrum
    decay_power: float = 1.0  # frequency f's amplitude is scaled by 1 / f^decay_power; 0: flat
    init_scale: float = 0.01  # std of the seeded start spectrum (a near-grey image)
    l2: float = 0.1  # penalty on the mean square of the sigmoid's input: keeps pixels off the bounds
    jitter: float = 2.0  # shift in pixels, per axis, in [-jitter, jitter]
    scale: float = 0.1  # zoom in [1 - scale, 1 + scale]
    rotate: float = 10.0  # degrees, in [-rotate, rotate]
    rectify: bool = True  # maximize mean(max(out, 0)), what a ReLU after the layer passes on

    def __post_init__(self):
        for name in ("steps", "learning_rate", "init_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"actmax {name} must be positive, got {getattr(self, name)}.")
        for name in ("decay_power", "l2", "jitter", "scale", "rotate"):
            if getattr(self, name) < 0:
                raise ValueError(f"actmax {name} must be non-negative, got {getattr(self, name)}.")
        if self.scale >= 1:
            raise ValueError(f"actmax scale must be < 1 (a zoom range of 1 ± scale), got "
                             f"{self.scale}.")

    def transforms(self) -> augment.Compose:
        """The random affine applied before every step's forward pass (zero-filled: black)."""
        steps = [(self.scale, augment.random_scale), (self.rotate, augment.random_rotation),
                 (self.jitter, augment.random_translation)]
        return augment.Compose(tuple(make(v) for v, make in steps if v > 0))


@dataclasses.dataclass(frozen=True)
class ActMaxResult:
    """Images (K, H, W, C) in model space, and each target's mean activation at start and end."""

    layer: str
    channels: np.ndarray
    images: np.ndarray
    start: np.ndarray
    final: np.ndarray
    bounds: tuple[Bound, Bound]  # the pixel range the images were kept in, per channel if it differs


def pixel_bounds(mean: Bound, std: Bound) -> tuple[Bound, Bound]:
    """The model-space values of pixels 0 and 1 (black, full) under `normalize(mean, std)`: two
    numbers when one constant serves all channels, else two per-channel tuples (a colour
    dataset's channels have their own mean and std, so their own range)."""
    means, stds = (np.ravel(np.asarray(v, np.float64)) for v in (mean, std))
    if means.size == 1 and stds.size == 1:
        m, s = float(means[0]), float(stds[0])
        return (0.0 - m) / s, (1.0 - m) / s
    lo, hi = (0.0 - means) / stds, (1.0 - means) / stds
    return tuple(map(float, lo)), tuple(map(float, hi))


def _check_bounds(bounds, channels: int) -> tuple[Bound, Bound]:
    """(low, high) as floats, or as per-channel tuples of `channels` floats; low < high."""
    ends = []
    for b in bounds:
        values = np.ravel(np.asarray(b, np.float64))
        if values.size not in (1, channels):
            raise ValueError(f"bounds must be (low, high), each one number or {channels} (one per "
                             f"channel), got {bounds}.")
        ends.append(float(values[0]) if values.size == 1 else tuple(map(float, values)))
    lo, hi = ends
    if not np.all(np.asarray(lo) < np.asarray(hi)):
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}.")
    return lo, hi


def in_units(images: np.ndarray, bounds: tuple[Bound, Bound]) -> np.ndarray:
    """Model-space (..., C) images -> [0, 1] on their pixel range, channel by channel."""
    lo, hi = (np.asarray(b) if isinstance(b, tuple) else b for b in bounds)
    return (images - lo) / (hi - lo)


def spectrum_scale(h: int, w: int, decay_power: float) -> np.ndarray:
    """(H, W // 2 + 1) amplitude scale of an rfft2 spectrum: 1 / max(f, 1 / max(H, W))^decay,
    f the radial frequency in cycles per pixel (the mean's scale is capped, not infinite)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return 1.0 / np.maximum(np.sqrt(fy ** 2 + fx ** 2), 1.0 / max(h, w)) ** decay_power


def fourier_logits(spectrum: jax.Array, image_shape: tuple[int, int, int],
                   decay_power: float) -> jax.Array:
    """(2, H, W // 2 + 1, C) real and imaginary parts -> the (H, W, C) image before its sigmoid."""
    h, w, _ = image_shape
    scale = jnp.asarray(spectrum_scale(h, w, decay_power), jnp.float32)[..., None]
    coefficients = lax.complex(spectrum[0], spectrum[1]) * scale
    return jnp.fft.irfft2(coefficients, s=(h, w), axes=(0, 1), norm="ortho")


def _channel(model, variables, layer: str, x: jax.Array, channel: jax.Array) -> jax.Array:
    """`channel` of `layer`'s output for one (H, W, C) image: (H, W) for a map, () for a unit."""
    logits, outputs = run_layers(model, variables, x[None])
    out = jax.nn.log_softmax(logits) if layer == LOGITS else outputs[layer]
    return jnp.take(out[0], channel, axis=-1)


def _measure(model, variables, layer: str, x: jax.Array, channel: jax.Array,
             rectify: bool) -> jax.Array:
    """The activation reported: the channel's mean response, rectified if asked; a class logit."""
    if layer == LOGITS:
        return run_layers(model, variables, x[None])[0][0, channel]
    out = _channel(model, variables, layer, x, channel)
    return jnp.maximum(out, 0.0).mean() if rectify else out.mean()


def _objective(out: jax.Array, rectify: bool) -> jax.Array:
    """What is ascended: the log of the rectified mean, so that the L2 term weighs the same
    against every channel whatever its scale; a rectified channel silent everywhere (zero
    gradient) has its pre-activation pushed up until it fires somewhere."""
    if not rectify:
        return out.mean()
    mean = jnp.maximum(out, 0.0).mean()
    return jnp.where(mean > 0, jnp.log(jnp.maximum(mean, jnp.finfo(out.dtype).tiny)), out.mean())


@functools.partial(jax.jit, static_argnames=("model", "layer", "cfg", "bounds", "image_shape"))
def _ascend_all(variables, channels, keys, *, model, layer, cfg, bounds, image_shape):
    rectify = cfg.rectify and layer != LOGITS
    lo, hi = (jnp.asarray(b, jnp.float32) if isinstance(b, tuple) else b for b in bounds)
    h, w, c = image_shape
    transforms = cfg.transforms()
    tx = optax.adam(cfg.learning_rate)

    def model_space(pixels):
        return lo + pixels * (hi - lo)

    def one(channel, key):
        start_key, steps_key = jax.random.split(key)
        spectrum0 = cfg.init_scale * jax.random.normal(start_key, (2, h, w // 2 + 1, c))

        def ascent_objective(spectrum, step_key):
            z = fourier_logits(spectrum, image_shape, cfg.decay_power)
            moved = augment.warp(jax.nn.sigmoid(z), transforms.matrix(step_key))
            out = _channel(model, variables, layer, model_space(moved), channel)
            return _objective(out, rectify) - cfg.l2 * jnp.mean(z ** 2)

        def step(carry, i):
            spectrum, opt_state = carry
            grad = jax.grad(ascent_objective)(spectrum, jax.random.fold_in(steps_key, i))
            updates, opt_state = tx.update(-grad, opt_state, spectrum)  # optax descends: negate
            return (optax.apply_updates(spectrum, updates), opt_state), None

        (spectrum, _), _ = lax.scan(step, (spectrum0, tx.init(spectrum0)), jnp.arange(cfg.steps))
        x0, x = (model_space(jax.nn.sigmoid(fourier_logits(s, image_shape, cfg.decay_power)))
                 for s in (spectrum0, spectrum))
        return (x, _measure(model, variables, layer, x0, channel, rectify),
                _measure(model, variables, layer, x, channel, rectify))

    return jax.vmap(one)(channels, keys)


def activation_maximization(model: nn.Module, variables: Mapping[str, Any], layer: str,
                            image_shape: Sequence[int], key: jax.Array, *,
                            bounds: tuple[Bound, Bound],
                            channels: Sequence[int] | None = None,
                            cfg: ActMaxConfig = ActMaxConfig()) -> ActMaxResult:
    """Maximizes each of `channels` of `layer` (all of them by default; 'logits' for classes).

    `bounds` is the pixel range in model space, `pixel_bounds(mean, std)`: two numbers, or two
    per-channel sequences for a colour dataset normalized channel by channel; `key`
    seeds the starts and the transforms, one stream per channel id, so a channel's result does
    not depend on which others are optimized with it.
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
    lo, hi = _check_bounds(bounds, image_shape[-1])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(channels))  # one per channel id
    images, start, final = _ascend_all(variables, jnp.asarray(channels), keys, model=model,
                                       layer=layer, cfg=cfg, bounds=(lo, hi), image_shape=image_shape)
    return ActMaxResult(layer=layer, channels=channels, images=np.asarray(images),
                        start=np.asarray(start), final=np.asarray(final), bounds=(lo, hi))


def actmax_grid(result: ActMaxResult, cmap: str = "gray") -> np.ndarray:
    """The optimized images as one RGBA grid on the pixel range they were kept in, channel by
    channel (a saturated tile is a real saturated image); tile k is `result.channels[k]`,
    row-major. Three channels show as RGB, one in `cmap`, any other count as their mean."""
    unit = in_units(result.images, result.bounds)  # (K, H, W, C)
    if unit.shape[-1] == 3:
        return rgb_grid(unit, gap=0.5)
    stacked = np.moveaxis(unit.mean(axis=-1), 0, -1)  # (H, W, K)
    return colorize(tile(stacked), cmap, gap=0.5)  # grey gaps: white tiles show
