"""The built-in datasets by name: what each is (its spec) and its TFDS builder, without TensorFlow.

* `mnist5k` (the default; embedded, no network), `mnist`, `fashion_mnist`: 28x28x1, 10 classes
  (cnnjax/data/mnist.py).
* `cifar10`, `cifar100`: 32x32x3, 10 or 100 classes; CIFAR-100's 20 superclasses with
  `data.label=coarse` (cnnjax/data/cifar.py).

Each is prepared once under `<data_dir>/cnnjax_<name>/1.0.0/` (array_record files) and read whole
into memory, in source order. A dataset that needs the network takes its official files from a
manual dir instead (`--manual-dir`, or `<data_dir>/downloads/manual`): see each module.
`imagefolder:PATH` and `tfds:NAME` datasets are described from their data
(cnnjax/data/imagefolder.py, tfds_prepared.py); a user's own arrays by cnnjax/data/sources.py.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from cnnjax.config import DataConfig
from cnnjax.data import cifar, mnist, store, stream

default_data_dir = store.default_data_dir


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of cnnjax needs to know about a dataset without loading it."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    # Normalization constants, applied after scaling pixels to [0, 1]: one for all channels, or
    # one per channel.
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    splits: tuple[str, ...]
    needs_download: bool
    class_names: tuple[str, ...] = ()  # one per class, when the dataset names them


_BUILDERS: dict[str, type[store.ArrayRecordBuilder]] = {**mnist.BUILDERS, **cifar.BUILDERS}


def _spec(name: str, builder: type[store.ArrayRecordBuilder], label: str) -> DatasetSpec:
    classes = builder.LABELS[label]
    names = () if isinstance(classes, int) else tuple(classes)
    return DatasetSpec(name, len(names) or classes, tuple(builder.IMAGE_SHAPE), builder.MEAN,
                       builder.STD, ("train", "test"), builder.NEEDS_DOWNLOAD, names)


# Each built-in's spec with its default label.
DATASETS: dict[str, DatasetSpec] = {name: _spec(name, b, "label") for name, b in _BUILDERS.items()}


def label_feature(name: str, label: str = "") -> str:
    """The builder's label feature that `data.label` names ('' is the dataset's default)."""
    builder = _BUILDERS[name]
    choices = {**{k: k for k in builder.LABELS}, **builder.LABEL_ALIASES}
    if label == "":
        return "label"
    if label not in choices:
        raise ValueError(f"data.label={label!r} is not a label of dataset {name!r}; choose one of "
                         f"{', '.join(map(repr, sorted(choices)))}, or leave it empty.")
    return choices[label]


def get_spec(name: str, label: str = "") -> DatasetSpec:
    """The spec of a built-in dataset (with `label`'s classes); the error lists the known names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of "
                         f"{', '.join(map(repr, DATASETS))}, imagefolder:PATH or tfds:NAME.")
    feature = label_feature(name, label)
    return DATASETS[name] if feature == "label" else _spec(name, _BUILDERS[name], feature)


def _builder(name: str, data_dir) -> store.ArrayRecordBuilder:
    with store.quiet():
        return _BUILDERS[name](data_dir=os.fspath(store.data_root(data_dir)))


def _prepared(name: str, data_dir, manual_dir) -> store.ArrayRecordBuilder:
    builder = _builder(name, data_dir)
    store.ensure_prepared(builder, lambda: builder.prepare(manual_dir))
    return builder


def _check_split(name: str, split: str, spec: DatasetSpec) -> None:
    if split not in spec.splits:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; choose one of "
                         f"{', '.join(map(repr, spec.splits))}.")


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
         manual_dir: str | os.PathLike | None = None, label: str = ""
         ) -> tuple[np.ndarray, np.ndarray]:
    """Prepares the dataset once (array_record under data_dir); returns the whole split in memory.

    Returns uint8 images (N, H, W, C) and int32 labels (N,) in source order. The arrays are
    read-only and shared by later calls with the same (name, split, data_dir): copy before writing.
    `manual_dir` is only read when the dataset still has to be prepared.
    """
    spec = get_spec(name, label)
    _check_split(name, split, spec)
    return _whole(_prepared(name, data_dir, manual_dir), split, label_feature(name, label), spec)


def read(cfg: DataConfig) -> stream.Stored:
    """The built-in dataset as a run of `cfg` reads it, prepared first if it is not yet: each split
    whole in memory (`load`), or, when `cfg` asks for streaming or the decoded pixels exceed the
    budget, its records read by index with its labels read once (without the images)."""
    spec = get_spec(cfg.dataset, cfg.label)
    builder = _prepared(cfg.dataset, cfg.data_dir, cfg.manual_dir)
    feature = label_feature(cfg.dataset, cfg.label)
    size = _decoded_bytes(spec, builder)
    if stream.wanted(cfg, size):
        splits = {split: _by_index(builder, split, feature) for split in spec.splits}
    else:
        splits = {split: _whole(builder, split, feature, spec) for split in spec.splits}
    return stream.Stored(spec, splits)


def _whole(builder: store.ArrayRecordBuilder, split: str, feature: str, spec: DatasetSpec
           ) -> tuple[np.ndarray, np.ndarray]:
    return store.load(builder, split, label_key=feature, image_shape=spec.image_shape,
                      fix=f"; delete {builder.data_path} to prepare it again")


def _by_index(builder: store.ArrayRecordBuilder, split: str, feature: str) -> stream.Split:
    labels = store.read_labels(builder.data_path, split, feature)
    return stream.whole(store.RecordReader(builder.data_path, split, len(labels)), labels)


def decoded_bytes(cfg: DataConfig) -> int:
    """Bytes of the dataset's decoded images, every split (prepared first if it is not yet)."""
    spec = get_spec(cfg.dataset, cfg.label)
    return _decoded_bytes(spec, _prepared(cfg.dataset, cfg.data_dir, cfg.manual_dir))


def _decoded_bytes(spec: DatasetSpec, builder: store.ArrayRecordBuilder) -> int:
    info = builder.info
    return sum(info.splits[s].num_examples for s in spec.splits) * math.prod(spec.image_shape)
