"""From dataset splits to batches: seeded train/validation split, replayable shuffles, normalization.

Images stay uint8 on the host (4x less to copy than float32) and are scaled and normalized inside
the compiled step by `normalize`. Batch order is a function of (seed, epoch) alone, so any epoch can
be replayed without running the ones before it. Training drops the last partial batch (a different
one each epoch, since the order is reshuffled); evaluation pads it and masks the padding, so every
example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import datasets
from cnnjax.config import DataConfig

_SPLIT_STREAM = 0x5EED  # keeps the validation split's draw apart from the epoch shuffles


@dataclasses.dataclass(frozen=True)
class Data:
    """The three splits of a run, in memory: uint8 (N, H, W, C) images and int32 labels."""

    spec: datasets.DatasetSpec
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (1 - f, f) partition of range(n); each part sorted, so it reads in file order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ValueError(f"data.val_fraction={val_fraction} of {n} examples leaves an empty split.")
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_data(cfg: DataConfig, seed: int) -> Data:
    """Loads the dataset's train and test splits and carves the validation set out of train."""
    spec = datasets.get_spec(cfg.dataset)
    images, labels = datasets.load(cfg.dataset, "train", data_dir=cfg.data_dir,
                                   manual_dir=cfg.manual_dir)
    test = datasets.load(cfg.dataset, "test", data_dir=cfg.data_dir, manual_dir=cfg.manual_dir)
    train_idx, val_idx = split_indices(len(labels), cfg.val_fraction, seed)
    return Data(spec=spec, train=(images[train_idx], labels[train_idx]),
                val=(images[val_idx], labels[val_idx]), test=test)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps in one epoch: full batches only, the remainder is dropped."""
    if batch_size <= 0:
        raise ValueError(f"train.batch_size must be positive, got {batch_size}.")
    if batch_size > num_examples:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {num_examples} training "
                         f"examples; choose at most {num_examples}.")
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches of one epoch from batch `start` on; the last partial batch is dropped.

    'index' is each example's position in the training split: the per-example random draws
    (dropout, augmentation) are keyed by it. `start` resumes an epoch without re-reading the
    batches before it.
    """
    n_steps = steps_per_epoch(len(labels), batch_size)
    order = epoch_permutation(len(labels), seed, epoch)[: n_steps * batch_size]
    for idx in order.reshape(n_steps, batch_size)[start:].astype(np.int32):
        yield {"image": images[idx], "label": labels[idx], "index": idx}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Batches in order, all of the same shape (one compile); the last is zero-padded with mask 0."""
    if batch_size <= 0:
        raise ValueError(f"train.eval_batch_size must be positive, got {batch_size}.")
    batch_size = min(batch_size, len(labels))
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(y)
        mask = np.ones(batch_size, np.float32)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            mask[batch_size - pad:] = 0.0
        yield {"image": x, "label": y, "mask": mask}


def normalize(images: jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 [0, 255] -> float32 scaled to [0, 1], then (x - mean) / std, as the seed's transforms."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def as_nhwc(images, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Accepts uint8 (N, H, W) or (N, H, W, C) matching `image_shape`; returns (N, H, W, C)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 pixels in [0, 255], got dtype {images.dtype}; "
                         f"pass the raw pixels, normalization is applied for you.")
    if images.ndim == 3 and image_shape[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images must be shaped (N, {image_shape[0]}, {image_shape[1]}) or "
                         f"(N, {', '.join(map(str, image_shape))}), got {images.shape}.")
    return images
