"""From dataset splits to a run's data: the seeded train/validation split and `data.classes`.

A run's data is held in memory (`load_data`, `Data` of cnnjax/data/memory.py) or streamed
through grain batch by batch (cnnjax/data/stream.py) when it is larger than `data.max_memory_gb` or `data.stream=on`
(`open_data` decides). Both give the same batches, with the same methods: `train_batches`,
`eval_batches`, `size`, `images`, and `position`/`restore` for the reader's place in a checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnjax.data import datasets, imagefolder, sources, stream, tfds_prepared
from cnnjax.data.memory import Data, eval_batches, train_batches
from cnnjax.data.order import split_indices, steps_per_epoch
from cnnjax.config import DataConfig

ReadError = stream.ReadError
Streamed = stream.Streamed


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
    return _with_classes(dataset_spec(cfg), cfg)


def _with_classes(spec: datasets.DatasetSpec, cfg: DataConfig) -> datasets.DatasetSpec:
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
    skipped = ()
    if cfg.dataset.startswith(imagefolder.PREFIX) and cfg.on_bad_image == "skip":
        skipped = imagefolder.skipped(cfg)
    return Data(spec=spec, train=pick(images[train_idx], labels[train_idx]),
                val=pick(images[val_idx], labels[val_idx]), test=pick(*test), skipped=skipped)


# The settings that say how a run's data is read, never what it computes.
READING_SETTINGS = frozenset({"data.stream", "data.max_memory_gb", "data.workers",
                              "data.read_timeout_s"})


def decoded_bytes(cfg: DataConfig) -> int:
    """The bytes of the dataset's decoded pixels, every stored split: what an in-memory run holds
    (about twice that at its peak, the split read and its training copy). Read from the prepared
    dataset's metadata or the files' headers, not from the pixels; 0 for arrays of one's own."""
    kind = _checked_kind(cfg)
    if kind == "builtin":
        return datasets.decoded_bytes(cfg.dataset, data_dir=cfg.data_dir,
                                      manual_dir=cfg.manual_dir, label=cfg.label)
    if kind in _PREFIXED:
        return _PREFIXED[kind].decoded_bytes(cfg)
    return 0


def streams(cfg: DataConfig) -> bool:
    """Whether a run of `cfg` streams its data: `data.stream=on`, or 'auto' with decoded pixels
    beyond `data.max_memory_gb`."""
    kind = _checked_kind(cfg)
    if cfg.stream == "off":
        return False
    if kind == "arrays":
        if cfg.stream == "on":
            raise ValueError(f"data.stream=on: dataset {cfg.dataset!r} is arrays of your own, "
                             f"already in memory; streaming reads built-in datasets, "
                             f"imagefolder:PATH and tfds:NAME. Remove the setting.")
        return False
    return cfg.stream == "on" or decoded_bytes(cfg) > cfg.max_memory_gb * 1e9


def open_data(cfg: DataConfig, seed: int) -> Data | stream.Streamed:
    """A run's data, in memory (`load_data`) or streamed (`streams`): the same splits, batches
    and spec either way. Streaming prepares nothing it does not have to (an image folder's pixels
    are read from its files); its one-time passes are named on stderr."""
    if not streams(cfg):
        data = load_data(cfg, seed)
        if cfg.dataset.startswith(imagefolder.PREFIX):
            imagefolder.report_skipped(cfg, data.skipped)
        return data
    kind = _checked_kind(cfg)
    if kind == "builtin":
        stored = datasets.streamed(cfg.dataset, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir,
                                   label=cfg.label)
    else:
        stored = _PREFIXED[kind].streamed(cfg)
    spec = _with_classes(stored.spec, cfg)
    train, test = stored.splits["train"], stored.splits["test"]
    train_idx, val_idx = split_indices(len(train), cfg.val_fraction, seed)
    pick = lambda split: _select_split(split, tuple(cfg.classes))
    if cfg.dataset.startswith(imagefolder.PREFIX):
        imagefolder.report_skipped(cfg, stored.skipped)
    return stream.Streamed(spec, pick(train.take(train_idx)), pick(train.take(val_idx)),
                           pick(test), workers=cfg.workers, timeout_s=cfg.read_timeout_s,
                           skipped=stored.skipped)


def _select_split(split: stream.Split, classes: tuple[int, ...]) -> stream.Split:
    """`select_classes` on a streamed split: its examples of `classes`, relabelled by position."""
    if not classes:
        return split
    kept, labels = select_classes(np.arange(len(split)), split.labels, classes)
    return split.take(kept, labels)


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
