"""Filter health: which conv filters respond to data, and which never fire.

A filter is measured at its pre-activation (the conv's output, or the norm layer's applied to it;
see `capture.preactivation`): its ReLU output is zero exactly where that is <= 0. Over a dataset
split each filter gets its mean rectified activation, the fraction of its outputs the ReLU zeroes,
and its largest pre-activation; a filter whose largest pre-activation is <= 0 never fires, passes
nothing on, and gets no gradient through its ReLU: it is dead and will stay so.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data.pixels import normalize
from cnnjax.nn.capture import conv_layers, list_layers, preactivation, run_layers


@dataclasses.dataclass(frozen=True)
class FilterHealth:
    """Per-filter statistics of one conv layer over a set of images."""

    layer: str
    measured_at: str  # the layer whose output was measured (the conv or its norm)
    mean_activation: np.ndarray  # mean of max(z, 0) over images and positions
    dead_fraction: np.ndarray  # fraction of (image, position) outputs with z <= 0
    max_preactivation: np.ndarray
    count: int  # images seen

    @property
    def dead(self) -> np.ndarray:
        """Indices of the filters that never fired on any image."""
        return np.flatnonzero(self.max_preactivation <= 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "measured_at": self.measured_at, "count": self.count,
                "num_filters": int(len(self.mean_activation)), "num_dead": int(len(self.dead)),
                "dead": self.dead.tolist(), "mean_activation": self.mean_activation.tolist(),
                "dead_fraction": self.dead_fraction.tolist(),
                "max_preactivation": self.max_preactivation.tolist()}


@functools.partial(jax.jit, static_argnames=("model", "mean", "std", "measured"))
def _batch_sums(variables, batch, mask, *, model, mean, std, measured):
    """Per filter: sum of max(z, 0), count of z <= 0, max z over the unmasked examples."""
    _, outputs = run_layers(model, variables, normalize(batch, mean, std))
    w = mask[:, None, None, None]
    return {name: (jnp.sum(jnp.maximum(outputs[at], 0.0) * w, axis=(0, 1, 2)),
                   jnp.sum((outputs[at] <= 0.0) * w, axis=(0, 1, 2)),
                   jnp.max(jnp.where(w > 0, outputs[at], -jnp.inf), axis=(0, 1, 2)))
            for name, at in measured}


def _static(value):
    """A hashable jit-static constant: a float, or one per channel as a tuple of floats."""
    return float(value) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


# Image pixels a filter-health batch holds (500 MNIST images): the batch's layer outputs, not the
# data, bound the pass's memory; at 64x64 a batch of 500 added 0.24 GB to a run's peak, 96 none.
_BATCH_PIXELS = 500 * 28 * 28


def filter_health(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray, mean: float,
                  std: float, layers: Sequence[str] | None = None, batch_size: int | None = None
                  ) -> dict[str, FilterHealth]:
    """Statistics for each conv layer (all of them by default) over images (N, H, W, C) in pixel
    units: uint8, or float32 0..255 (`cnnjax.data.sources` keeps float data so), or an array-like
    with `shape` and `dtype` read by slices (a streamed split's view), never held whole.

    Batches (`batch_size`, by default as many images as hold `_BATCH_PIXELS` pixels) are padded
    to one shape (one compile) and the padding masked out; each batch's sums are pulled to the
    host (a sync per batch) and added there.
    """
    if not (hasattr(images, "shape") and hasattr(images, "dtype")):
        images = np.asarray(images)
    if images.dtype not in (np.uint8, np.float32) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"filter_health takes a non-empty uint8 or float32 batch (N, H, W, C), got "
                         f"{images.dtype} {images.shape}.")
    if batch_size is None:
        batch_size = max(1, _BATCH_PIXELS // (images.shape[1] * images.shape[2]))
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    table = list_layers(model, variables, images.shape[1:])
    convs = [l.name for l in conv_layers(table)]
    layers = convs if layers is None else list(layers)
    unknown = [n for n in layers if n not in convs]
    if unknown:
        raise ValueError(f"filter health is measured on conv layers; {unknown} are not among "
                         f"{', '.join(convs) or 'none'}.")
    measured = {n: preactivation(table, n).name for n in layers}

    batch_size = min(batch_size, len(images))
    totals: dict[str, list] = {}
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size])
        mask = np.ones(batch_size, np.float32)
        if len(batch) < batch_size:
            mask[len(batch):] = 0.0
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]),
                                                    images.dtype)])
        stats = jax.device_get(_batch_sums(variables, batch, mask, model=model, mean=_static(mean),
                                           std=_static(std), measured=tuple(measured.items())))
        for name, (act, off, top) in stats.items():
            act, off = np.asarray(act, np.float64), np.asarray(off, np.float64)
            if name not in totals:
                totals[name] = [act, off, top]
            else:
                t = totals[name]
                totals[name] = [t[0] + act, t[1] + off, np.maximum(t[2], top)]
    result = {}
    for name in layers:  # call order (jit hands dicts back sorted by key)
        act, off, top = totals[name]
        positions = len(images) * int(np.prod(
            next(l for l in table if l.name == measured[name]).shape[:2]))
        result[name] = FilterHealth(layer=name, measured_at=measured[name],
                                    mean_activation=act / positions, dead_fraction=off / positions,
                                    max_preactivation=np.asarray(top), count=len(images))
    return result


def dead_filter_count(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                      spec) -> int:
    """Conv filters that never fire on `images` (uint8), over all conv layers; for summary.json.

    `spec` is the dataset spec (its `mean` and `std` normalize the pixels as in training).
    """
    health = filter_health(model, variables, images, spec.mean, spec.std)
    return int(sum(len(h.dead) for h in health.values()))
