"""A run's data, opened once: the kind of dataset `data.dataset` names, read in memory or streamed,
with the seeded validation carve-out and `data.classes`.

Each kind of dataset is read by its own module's `read(cfg)`: the built-ins (cnnjax/data/
datasets.py), `imagefolder:PATH` and `tfds:NAME` (imagefolder.py, tfds_prepared.py), arrays of
one's own (sources.py). `read` describes the dataset once and hands back a `stream.Stored`: the
spec and the two stored splits, whole in memory or by index for grain, as a run of `cfg` reads
them (streamed with `data.stream=on`, or 'auto' where the decoded pixels exceed
`data.max_memory_gb`). `open_data` checks the kind, reads it once and makes the run's three
splits: `Data` in memory (cnnjax/data/memory.py) or `Streamed` through grain (stream.py), the same
batches either way, with the same methods: `train_batches`, `eval_batches`, `size`, `images`, and
`position`/`restore` for the reader's place in a checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnjax import notices
from cnnjax.config import DataConfig
from cnnjax.data import datasets, imagefolder, sources, stream, tfds_prepared
from cnnjax.data.memory import Data, eval_batches, train_batches
from cnnjax.data.order import split_indices, steps_per_epoch

ReadError = stream.ReadError
Streamed = stream.Streamed

# The module that reads each kind of dataset: read(cfg) -> stream.Stored, decoded_bytes(cfg).
_KINDS = {"builtin": datasets, "imagefolder:": imagefolder, "tfds:": tfds_prepared,
          "arrays": sources}
_SPLITS = ("train", "test")

# The data settings each kind of dataset does not take, and why: refused before anything loads.
_NOT_FOR = {
    "builtin": {"image_size": "a built-in dataset has one image size"},
    "imagefolder:": {"label": "an image folder has one label, its class folders"},
    "tfds:": {},
    "arrays": {"label": "arrays of your own carry one label and their own size",
               "image_size": "arrays of your own carry one label and their own size"},
}

# The settings that say how a run's data is read, never what it computes.
READING_SETTINGS = frozenset({"data.stream", "data.max_memory_gb", "data.workers",
                              "data.read_timeout_s"})


def _as_config(cfg: DataConfig | str) -> DataConfig:
    return DataConfig(dataset=cfg) if isinstance(cfg, str) else cfg


def _checked_kind(cfg: DataConfig) -> str:
    """The kind of `cfg`'s dataset, once each setting it does not take is known to be unset."""
    kind = ("builtin" if cfg.dataset in datasets.DATASETS
            else next((p for p in ("imagefolder:", "tfds:") if cfg.dataset.startswith(p)),
                      "arrays"))
    for field, why in _NOT_FOR[kind].items():
        if value := getattr(cfg, field):
            shown = list(value) if isinstance(value, tuple) else repr(value)
            raise ValueError(f"data.{field}={shown} does not apply to dataset {cfg.dataset!r} "
                             f"({why}); remove the setting.")
    return kind


def _in_memory(cfg: DataConfig) -> DataConfig:
    return dataclasses.replace(cfg, stream="off")


def open_data(cfg: DataConfig, seed: int) -> Data | Streamed:
    """A run's data, in memory or streamed: the same splits, batches and spec either way.
    Streaming prepares nothing it does not have to (an image folder's pixels are read from its
    files); its one-time passes are named on stderr."""
    stored = _KINDS[_checked_kind(cfg)].read(cfg)
    _warn_skipped(cfg, stored.skipped)
    return _run_data(cfg, stored, seed)


def load_data(cfg: DataConfig, seed: int) -> Data:
    """The run's data in memory, whatever the streaming settings."""
    return _run_data(cfg, _KINDS[_checked_kind(cfg)].read(_in_memory(cfg)), seed)


def _run_data(cfg: DataConfig, stored: stream.Stored, seed: int) -> Data | Streamed:
    """The run's three splits from the stored two: the validation set carved out of train by the
    seed, then `data.classes` kept, so an example is in validation for every class subset exactly
    when it is for the whole dataset (with the same seed)."""
    spec = _with_classes(stored.spec, cfg)
    train, test = stored.splits["train"], stored.splits["test"]
    classes = tuple(cfg.classes)
    if stored.streamed:
        train_idx, val_idx = split_indices(len(train), cfg.val_fraction, seed)
        pick = lambda split: _select_split(split, classes)
        return Streamed(spec, pick(train.take(train_idx)), pick(train.take(val_idx)), pick(test),
                        workers=cfg.workers, timeout_s=cfg.read_timeout_s, skipped=stored.skipped)
    images, labels = train
    train_idx, val_idx = split_indices(len(labels), cfg.val_fraction, seed)
    pick = lambda x, y: select_classes(x, y, classes)
    return Data(spec=spec, train=pick(images[train_idx], labels[train_idx]),
                val=pick(images[val_idx], labels[val_idx]), test=pick(*test),
                skipped=stored.skipped)


def _warn_skipped(cfg: DataConfig, skipped: tuple[str, ...]) -> None:
    """The one line that says which files a run leaves out (`data.on_bad_image=skip`)."""
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                         else "")
        notices.warn(f"{cfg.dataset}: skipped {len(skipped)} unreadable image"
                     f"{'s' if len(skipped) > 1 else ''} (data.on_bad_image=skip): {shown}.")


def dataset_spec(cfg: DataConfig | str) -> datasets.DatasetSpec:
    """The spec of any dataset (a name stands for its default config); a built-in's comes
    without loading it, the others' from their data."""
    cfg = _as_config(cfg)
    kind = _checked_kind(cfg)
    if kind == "builtin":
        return datasets.get_spec(cfg.dataset, cfg.label)
    return _KINDS[kind].read(_in_memory(cfg)).spec


def load_split(cfg: DataConfig | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One whole split of any dataset: images in host units (cnnjax/data/memory.py), labels; a
    built-in's split is read alone (evaluating on 'test' reads no training images)."""
    cfg = _as_config(cfg)
    kind = _checked_kind(cfg)
    if split not in _SPLITS:
        raise ValueError(f"Dataset {cfg.dataset!r} has no split {split!r}; choose one of "
                         f"{', '.join(map(repr, _SPLITS))}.")
    if kind == "builtin":
        return datasets.load(cfg.dataset, split, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir,
                             label=cfg.label)
    return _KINDS[kind].read(_in_memory(cfg)).splits[split]


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


def _select_split(split: stream.Split, classes: tuple[int, ...]) -> stream.Split:
    """`select_classes` on a streamed split: its examples of `classes`, relabelled by position."""
    if not classes:
        return split
    kept, labels = select_classes(np.arange(len(split)), split.labels, classes)
    return split.take(kept, labels)


def decoded_bytes(cfg: DataConfig) -> int:
    """The bytes of the dataset's decoded pixels, every stored split: what an in-memory run holds
    (about twice that at its peak, the split read and its training copy). Read from the prepared
    dataset's metadata or the files' headers, not from the pixels; 0 for arrays of one's own."""
    kind = _checked_kind(cfg)
    return 0 if kind == "arrays" else _KINDS[kind].decoded_bytes(cfg)


def streams(cfg: DataConfig) -> bool:
    """Whether a run of `cfg` streams its data: `data.stream=on`, or 'auto' with decoded pixels
    beyond `data.max_memory_gb`; arrays of one's own are in memory already."""
    if _checked_kind(cfg) == "arrays":
        return sources.read(cfg).streamed
    return stream.wanted(cfg, decoded_bytes(cfg))


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
