"""Numbers that say whether a picture informs: localization of a saliency map, saturation and
high-frequency energy of an optimized image.

Pure NumPy on host arrays, so a hand-made case checks each: a map that is exactly the stroke scores
1.0 on both localization measures, a checkerboard has all its energy above half the Nyquist
frequency, an image clipped to its bounds is all saturated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

INK = 0.5  # a pixel (display range [0, 1]) is stroke when brighter than this
SATURATED = 0.02  # within this fraction of the pixel range of a bound: saturated (5 of 255 levels)


def stroke_mask(pixels: np.ndarray, threshold: float = INK, dilate: int = 1) -> np.ndarray:
    """(N, H, W[, C]) display-range images -> (N, H, W) bool: ink, dilated by `dilate` pixels
    (3x3 square), so a map that peaks on the stroke's anti-aliased edge still counts as on it."""
    pixels = np.asarray(pixels, np.float64)
    ink = (pixels.max(axis=-1) if pixels.ndim == 4 else pixels) > threshold
    if dilate <= 0:
        return ink
    return ndimage.binary_dilation(ink, structure=np.ones((1, 3, 3), bool), iterations=dilate)


@dataclasses.dataclass(frozen=True)
class Localization:
    """How much of a saliency map falls on the object, against a uniform map as the floor."""

    images: int
    pointing: float  # fraction of images whose map maximum is on the mask
    mass: float  # mean fraction of the map's total on the mask
    coverage: float  # mean over the mask of the map / its maximum: 1 covers it all, ~0 a speck
    uniform_pointing: float  # a uniform map's maximum is any pixel: expected hit = mask area
    uniform_mass: float  # a uniform map's mass on the mask = mask area (its coverage is 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def localization(maps: np.ndarray, masks: np.ndarray) -> Localization:
    """The pointing game (Zhang et al., 2016), the mass on the mask and the coverage of the mask,
    per (N, H, W) map, averaged.

    Pointing and mass reward a single hot pixel on the stroke as much as a map along all of it;
    the coverage tells them apart. A map that is zero everywhere (Grad-CAM whose weighted sum is
    negative at every position) has no maximum and no mass: it scores a miss and 0.
    """
    maps = np.asarray(maps, np.float64).reshape(len(maps), -1)
    masks = np.asarray(masks, bool).reshape(len(masks), -1)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape.")
    if np.any(maps < 0):
        raise ValueError("localization takes non-negative maps (a CAM, a gradient magnitude).")
    total = maps.sum(axis=1)
    lit = total > 0
    hits = lit & masks[np.arange(len(maps)), maps.argmax(axis=1)]
    mass = np.where(lit, (maps * masks).sum(axis=1) / np.where(lit, total, 1.0), 0.0)
    peak = maps.max(axis=1)
    relative = maps / np.where(lit, peak, 1.0)[:, None]
    area = masks.mean(axis=1)
    cover = (relative * masks).sum(axis=1) / np.maximum(masks.sum(axis=1), 1)
    return Localization(images=len(maps), pointing=float(hits.mean()), mass=float(mass.mean()),
                        coverage=float(cover.mean()), uniform_pointing=float(area.mean()),
                        uniform_mass=float(area.mean()))


def saturation(images: np.ndarray, bounds, tol: float = SATURATED) -> np.ndarray:
    """(K, H, W, C) images -> (K,) fraction of values within `tol` of the range's ends; `bounds`
    is (low, high), each a number or one per channel (a colour dataset's own ranges)."""
    lo, hi = (np.asarray(b, np.float64) for b in bounds)
    unit = (np.asarray(images, np.float64) - lo) / (hi - lo)
    flat = unit.reshape(len(unit), -1)
    return ((flat <= tol) | (flat >= 1 - tol)).mean(axis=1)


def high_frequency_share(images: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """(K, H, W, C) images -> (K,) share of spectral energy at radial frequencies above `cutoff`
    cycles per pixel (0.25: half the Nyquist frequency), the mean (DC) left out.

    A digit's strokes are a few pixels wide and keep most energy below it; a pixel-scale stripe
    or checkerboard pattern puts nearly all of it above.
    """
    x = np.asarray(images, np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).sum(axis=-1)  # (K, H, W)
    fy = np.fft.fftfreq(x.shape[1])[:, None]
    fx = np.fft.fftfreq(x.shape[2])[None, :]
    high = np.sqrt(fy ** 2 + fx ** 2) > cutoff
    total = power.sum(axis=(1, 2))
    return np.where(total > 0, (power * high).sum(axis=(1, 2)) / np.where(total > 0, total, 1.0),
                    0.0)
