"""Pixels to model inputs: the normalization every model sees, applied inside compiled programs.

Images travel in host units (uint8, or float32 in 0..255: cnnjax/data/memory.py) and
become the network's input here, on the device: training, evaluation, a loaded run and the
pictures all go through this one function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalize(images: jax.Array, mean: float | tuple[float, ...],
              std: float | tuple[float, ...]) -> jax.Array:
    """Pixels in 0..255 units -> float32 scaled to [0, 1], then (x - mean) / std, as the seed's
    transforms; `mean` and `std` are one number or one per channel (the last axis)."""
    mean, std = (_per_channel(v, images.shape[-1], k) for k, v in (("mean", mean), ("std", std)))
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def _per_channel(value, channels: int, what: str):
    """A number as it is; a 1-tuple as its number (so it computes exactly as the number does);
    one value per channel as a float32 vector, broadcast over the last axis."""
    if np.ndim(value) == 0:
        return value
    value = tuple(value)
    if len(value) == 1:
        return value[0]
    if len(value) != channels:
        raise ValueError(f"normalize: {what} has {len(value)} values for {channels}-channel "
                         f"images; give one number or one per channel.")
    return np.asarray(value, np.float32)
