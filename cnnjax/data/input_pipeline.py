"""From dataset splits to batches: seeded train/validation split, replayable shuffles, normalization.

Images stay uint8 on the host (4x less to copy than float32) and are scaled and normalized inside
the compiled step by `pixels.normalize`; a dataset of float images (cnnjax/data/sources.py) is held as
float32 in the same 0..255 units, so one `normalize` serves both. Batch order is a function of
(seed, epoch) alone, so any epoch can be replayed without running the ones before it. Training
drops the last partial batch (a different one each epoch, since the order is reshuffled);
evaluation pads it and masks the padding, so every example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from cnnjax.data import datasets, imagefolder, sources, tfds_prepared
from cnnjax.config import DataConfig

_SPLIT_STREAM = 0x5EED  # keeps the validation split's draw apart from the epoch shuffles


@dataclasses.dataclass(frozen=True)
class Data:
    """The three splits of a run, in memory: (N, H, W, C) images, uint8 or float32 in 0..255
    units, and int32 labels."""

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


def is_builtin(dataset: str) -> bool:
    return dataset in datasets.DATASETS


# Datasets named by a prefix and described from their data: each module has spec(cfg), load(cfg, split).
_PREFIXED = {"imagefolder:": imagefolder, "tfds:": tfds_prepared}


def _as_config(cfg: DataConfig | str) -> DataConfig:
    return DataConfig(dataset=cfg) if isinstance(cfg, str) else cfg


# The data settings each kind of dataset does not take, and why: refused before anything loads.
_NOT_FOR = {
    "builtin": {"image_size": "a built-in dataset has one image size"},
    "imagefolder:": {"label": "an image folder has one label, its class folders"},
    "tfds:": {},
    "arrays": {"label": "arrays of your own carry one label and their own size",
               "image_size": "arrays of your own carry one label and their own size"},
}


def _checked_kind(cfg: DataConfig) -> str:
    """The kind of `cfg`'s dataset, once each setting it does not take is known to be unset."""
    kind = ("builtin" if is_builtin(cfg.dataset)
            else next((p for p in _PREFIXED if cfg.dataset.startswith(p)), "arrays"))
    for field, why in _NOT_FOR[kind].items():
        if value := getattr(cfg, field):
            shown = list(value) if isinstance(value, tuple) else repr(value)
            raise ValueError(f"data.{field}={shown} does not apply to dataset {cfg.dataset!r} "
                             f"({why}); remove the setting.")
    return kind


def dataset_spec(cfg: DataConfig | str) -> datasets.DatasetSpec:
    """The spec of any dataset (a name stands for its default config); a built-in's comes
    without loading it, the others' from their data."""
    cfg = _as_config(cfg)
    kind = _checked_kind(cfg)
    if kind == "builtin":
        return datasets.get_spec(cfg.dataset, cfg.label)
    if kind in _PREFIXED:
        return _PREFIXED[kind].spec(cfg)
    return sources.load(cfg.dataset).spec


def load_split(cfg: DataConfig | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One whole split of any dataset: images in host units (see the module docstring), labels."""
    cfg = _as_config(cfg)
    kind = _checked_kind(cfg)
    if kind == "builtin":
        return datasets.load(cfg.dataset, split, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir,
                             label=cfg.label)
    if kind in _PREFIXED:
        return _PREFIXED[kind].load(cfg, split)
    source = sources.load(cfg.dataset)
    if split not in sources.SPLITS:
        raise ValueError(f"Dataset {cfg.dataset!r} has no split {split!r}; choose one of "
                         f"{', '.join(map(repr, sources.SPLITS))}.")
    return getattr(source, split)


def data_spec(cfg: DataConfig) -> datasets.DatasetSpec:
    """The dataset's spec; with `data.classes` its num_classes is the number of classes kept."""
    spec = dataset_spec(cfg)
    classes = tuple(cfg.classes)
    if not classes:
        return spec
    if len(set(classes)) != len(classes) or not all(0 <= c < spec.num_classes for c in classes):
        raise ValueError(f"data.classes must be distinct labels of {cfg.dataset} (0..."
                         f"{spec.num_classes - 1}), got {classes}.")
    names = tuple(spec.class_names[c] for c in classes) if spec.class_names else ()
    return dataclasses.replace(spec, num_classes=len(classes), class_names=names)


def select_classes(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The examples whose label is in `classes`, relabelled by position: classes[i] -> i."""
    if not classes:
        return images, labels
    lookup = np.full(max(int(labels.max()), *classes) + 1, -1, np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]].astype(labels.dtype)


def load_data(cfg: DataConfig, seed: int) -> Data:
    """Loads the dataset's train and test splits and carves the validation set out of train.

    `data.classes` is applied after the split, so an example is in validation for every class
    subset exactly when it is for the whole dataset (with the same seed).
    """
    spec = data_spec(cfg)
    images, labels = load_split(cfg, "train")
    test = load_split(cfg, "test")
    train_idx, val_idx = split_indices(len(labels), cfg.val_fraction, seed)
    pick = lambda x, y: select_classes(x, y, tuple(cfg.classes))
    return Data(spec=spec, train=pick(images[train_idx], labels[train_idx]),
                val=pick(images[val_idx], labels[val_idx]), test=pick(*test))


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


def _rows(n: int, part: tuple[int, int]) -> slice:
    """The rows of an n-row global batch that process `part[0]` of `part[1]` loads."""
    index, count = part
    if n % count:
        raise ValueError(f"a batch of {n} does not split across {count} processes; choose a "
                         f"multiple of {count}.")
    return slice(index * n // count, (index + 1) * n // count)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  epoch: int, start: int = 0, part: tuple[int, int] = (0, 1)
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches of one epoch from batch `start` on; the last partial batch is dropped.

    'index' is each example's position in the training split: the per-example random draws
    (dropout, augmentation) are keyed by it. `start` resumes an epoch without re-reading the
    batches before it. With `part=(process, count)` only that process's rows of each global batch
    are read, every process agreeing on the global order.
    """
    n_steps = steps_per_epoch(len(labels), batch_size)
    order = epoch_permutation(len(labels), seed, epoch)[: n_steps * batch_size]
    rows = _rows(batch_size, part)
    for idx in order.reshape(n_steps, batch_size)[start:, rows].astype(np.int32):
        yield {"image": images[idx], "label": labels[idx], "index": idx}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
    """Batches in order, all of the same shape (one compile); the last is zero-padded with mask 0,
    so every example counts exactly once. `part` as in `train_batches`."""
    if batch_size <= 0:
        raise ValueError(f"train.eval_batch_size must be positive, got {batch_size}.")
    rows = _rows(batch_size, part)
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(y)
        mask = np.ones(batch_size, np.float32)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            mask[batch_size - pad:] = 0.0
        yield {"image": x[rows], "label": y[rows], "mask": mask[rows]}


def as_nhwc(images, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Accepts uint8 pixels or floats in [0, 1], (N, H, W) or (N, H, W, C) matching
    `image_shape`; returns (N, H, W, C) in host units (uint8, or float32 in 0..255)."""
    images = np.asarray(images)
    if images.ndim == 3 and image_shape[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images must be shaped (N, {image_shape[0]}, {image_shape[1]}) or "
                         f"(N, {', '.join(map(str, image_shape))}), got {images.shape}.")
    return sources.host_pixels(images, "images")
