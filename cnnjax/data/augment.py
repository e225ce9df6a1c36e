"""On-device data augmentation: random affine warps drawn per example from folded keys.

Every transform (scale, rotation, translation, padded crop, horizontal flip) is an affine map of
the pixel grid, so a pipeline composes them into one 3x3 matrix per example, in the configured
order as torchvision's `transforms.Compose` would apply them, and resamples each image once (bilinear, zero fill) instead
of once per transform: one interpolation blur, one gather. It runs inside the jitted train step on
pixel values (before normalization, so the fill is black as in torchvision), vectorized with vmap.

Each example's draw comes from `fold_in(key, example_index)`, so an image's augmentation depends on
the run's key, the step and the example alone, not on the batch it shares or the device it is on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from cnnjax import imports
from cnnjax.config import AugmentConfig

# A transform draws one example's forward 3x3 affine matrix (in pixel coordinates centred on the
# image) from a key.
Transform = Callable[[jax.Array], jax.Array]


def _matrix(a, b, c, d, tx=0.0, ty=0.0) -> jax.Array:
    """[[a, b, tx], [c, d, ty], [0, 0, 1]] acting on (row, col, 1) column vectors."""
    return jnp.array([[a, b, tx], [c, d, ty], [0.0, 0.0, 1.0]], jnp.float32)


def random_rotation(degrees: float) -> Transform:
    """Rotation by an angle uniform in [-degrees, degrees] about the image centre."""
    def draw(key):
        theta = jnp.deg2rad(jax.random.uniform(key, (), minval=-degrees, maxval=degrees))
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        return _matrix(cos, -sin, sin, cos)
    return draw


def random_scale(fraction: float) -> Transform:
    """Zoom by a factor uniform in [1 - fraction, 1 + fraction] about the centre."""
    def draw(key):
        s = jax.random.uniform(key, (), minval=1.0 - fraction, maxval=1.0 + fraction)
        return _matrix(s, 0.0, 0.0, s)
    return draw


def random_translation(pixels: float) -> Transform:
    """Shift by (dy, dx) each uniform in [-pixels, pixels]; the uncovered border is zero-filled,
    like a random crop from a zero-padded image but with sub-pixel offsets."""
    def draw(key):
        dy, dx = jax.random.uniform(key, (2,), minval=-pixels, maxval=pixels)
        return _matrix(1.0, 0.0, 0.0, 1.0, dy, dx)
    return draw


def random_crop(padding: int) -> Transform:
    """torchvision's RandomCrop(size, padding): a whole-pixel shift (dy, dx), each uniform in
    {-padding, ..., padding}, zero-filled; integer offsets resample exactly, with no blur."""
    def draw(key):
        dy, dx = jax.random.randint(key, (2,), -padding, padding + 1).astype(jnp.float32)
        return _matrix(1.0, 0.0, 0.0, 1.0, dy, dx)
    return draw


def random_flip(probability: float = 0.5) -> Transform:
    """Mirror left-right with the given probability."""
    def draw(key):
        flip = jax.random.bernoulli(key, probability)
        return _matrix(1.0, 0.0, 0.0, jnp.where(flip, -1.0, 1.0))
    return draw


def warp(image: jax.Array, forward: jax.Array) -> jax.Array:
    """Resamples an (H, W, C) image under the forward affine map (centred coordinates), bilinear,
    zero outside: each output pixel reads the input at forward^-1 of its own position."""
    h, w = image.shape[:2]
    centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    out = jnp.stack([rows.ravel(), cols.ravel()]) - centre[:, None]
    inverse = jnp.linalg.inv(forward)
    src = inverse[:2, :2] @ out + inverse[:2, 2:] + centre[:, None]
    coords = [src[0].reshape(h, w), src[1].reshape(h, w)]
    sample = lambda channel: map_coordinates(channel, coords, order=1, mode="constant", cval=0.0)
    return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


@dataclasses.dataclass(frozen=True)
class Compose:
    """Transforms applied in order (first listed acts first), drawn per example, one resample.

    `on` (one entry per transform; empty: all on) holds, for a transform whose magnitude is traced
    (`from_config(..., traced=...)`), whether it is on: an array, for a program shared by configs
    that turn it on and off. A transform that is off leaves the matrix as it is and takes no key
    index, so each transform draws from the key a config's own pipeline would give it."""

    transforms: Sequence[Transform]
    on: Sequence[jax.Array | None] = ()

    def matrix(self, key: jax.Array) -> jax.Array:
        m = jnp.eye(3, dtype=jnp.float32)
        index = 0  # a Python int unless a transform's `on` is traced
        for draw, on in zip(self.transforms, self.on or [None] * len(self.transforms)):
            drawn = draw(jax.random.fold_in(key, index)) @ m
            if on is None:
                m, index = drawn, index + 1
            else:  # an identity step is exact: the off transform changes no pixel
                m, index = jnp.where(on, drawn, m), index + on.astype(jnp.int32)
        return m

    def __call__(self, images: jax.Array, key: jax.Array, example_ids: jax.Array) -> jax.Array:
        """(N, H, W, C) float pixels -> augmented pixels; example i uses fold_in(key, example_ids[i])."""
        if not self.transforms:
            return images
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)
        return jax.vmap(lambda img, k: warp(img, self.matrix(k)))(images, keys)


# Name -> factory(cfg: AugmentConfig) -> Transform, or None when the config leaves it off. The
# built-ins read their magnitude from their own field; a user's transform, registered or named by
# an import path in `augment.order`, reads its arguments from `augment.kwargs[name]`.
AUGMENTATIONS = imports.Registry("augmentation", "augment.order")
register_augmentation = AUGMENTATIONS.register
register_augmentation("scale", lambda cfg: random_scale(cfg.scale) if cfg.scale else None)
register_augmentation("rotate", lambda cfg: random_rotation(cfg.rotate) if cfg.rotate else None)
register_augmentation("translate",
                      lambda cfg: random_translation(cfg.translate) if cfg.translate else None)
register_augmentation("crop", lambda cfg: random_crop(cfg.crop) if cfg.crop else None)
register_augmentation("flip", lambda cfg: random_flip(0.5) if cfg.flip else None)
BUILT_IN = ("scale", "rotate", "translate", "crop", "flip")


# The built-in transforms whose magnitude may be an array (`from_config(..., traced=...)`).
TRACEABLE = {"rotate": random_rotation, "translate": random_translation, "scale": random_scale}


def from_config(cfg: AugmentConfig, traced: dict[str, jax.Array] | None = None) -> Compose:
    """The pipeline a config asks for, in `cfg.order`; transforms left at zero/off are skipped.

    `traced` maps names of TRACEABLE to magnitudes held as arrays (inside a compiled program
    shared by several configs, each checked here beforehand): such a transform is in the
    pipeline, on where its magnitude is above 0."""
    if traced:
        transforms, on = [], []
        for name in cfg.order:
            if name in traced:
                transforms.append(TRACEABLE[name](traced[name]))
                on.append(traced[name] > 0)
            elif (transform := imports.call(AUGMENTATIONS.lookup(name), f"augmentation {name!r}",
                                            cfg)) is not None:
                transforms.append(transform)
                on.append(None)
        return Compose(tuple(transforms), tuple(on))
    left_out = [name for name in BUILT_IN if name not in cfg.order and AUGMENTATIONS.lookup(name)(cfg)]
    if left_out:
        raise ValueError(f"augment.order {list(cfg.order)} leaves out {left_out}, which the config "
                         f"turns on; add them to augment.order (first listed acts first).")
    for name in ("rotate", "translate", "scale", "crop"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"augment.{name} must be >= 0, got {getattr(cfg, name)}.")
    if cfg.scale >= 1:
        raise ValueError(f"augment.scale must be < 1 (a zoom range of 1 ± scale), got {cfg.scale}.")
    unused = sorted(set(cfg.kwargs) - set(cfg.order))
    if unused:
        raise ValueError(f"augment.kwargs has arguments for {unused}, which augment.order does not "
                         f"name; add them to augment.order or remove their arguments.")
    transforms = []
    for name in cfg.order:
        what = f"augmentation {name!r}"
        transform = imports.call(AUGMENTATIONS.lookup(name), what, cfg,
                                 expected="a factory(cfg) returning a Transform or None")
        if transform is not None and not callable(transform):
            raise ValueError(f"{what} gave {imports.kind(transform)}; a factory returns a "
                             f"Transform, key -> 3x3 affine matrix, or None for off.")
        if transform is not None:
            _check_transform(what, transform)
        transforms.append(transform)
    return Compose(tuple(t for t in transforms if t is not None))


def _check_transform(what: str, transform: Transform) -> None:
    """Draws the transform abstractly on a key (`jax.eval_shape`: nothing runs or compiles) and
    checks it gives a 3x3 matrix of floats."""
    try:
        out = jax.eval_shape(transform, jax.random.key(0))
    except Exception as err:  # the user's function: any failure is a misfit, reported as one
        raise ValueError(f"{what}: its Transform fails on a PRNG key: {imports.where(err)}"
                         f"{imports.first_line(err)}") from None
    if getattr(out, "shape", None) != (3, 3) or not jnp.issubdtype(out.dtype, jnp.floating):
        shown = f"{out.dtype}{list(out.shape)}" if hasattr(out, "dtype") else imports.kind(out)
        raise ValueError(f"{what}: its Transform returns {shown} for a key; it must return the "
                         f"3x3 affine matrix (float) of one example's warp.")
