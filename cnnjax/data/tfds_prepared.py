"""`tfds:NAME[/CONFIG][:VERSION]`: a TFDS dataset already prepared in array_record format in the
data dir (by a colleague with TensorFlow, say), read from its files alone.

TFDS's own builders read their sources through TensorFlow, so the dataset's builder code is never
imported: `tfds.builder_from_directory` rebuilds the builder from the `dataset_info.json` and
`features.json` of `<data_dir>/NAME[/CONFIG]/VERSION` (the latest version when none is given, the
default config that TFDS recorded when none is named), and `as_data_source` reads the records,
decoding `tfds.features.Image` with Pillow. The "train" and "test" splits are used; a dataset
without "test" is tested on a seeded, stratified hold-out of `data.test_fraction` of "train"
(`store.holdout`: fixed by the data alone, the same in every run) and trained on the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from tensorflow_datasets.core import dataset_builder
from tensorflow_datasets.core.utils import file_utils

from cnnjax.config import DataConfig
from cnnjax.data import datasets, store, stream

PREFIX = "tfds:"
_SPLITS = ("train", "test")

# TFDS's own parser (naming.parse_builder_name_kwargs) also takes namespaces, builder kwargs and
# CamelCase names, none of which names a directory in the data dir.
_NAME = re.compile(r"(?P<name>\w+)(?:/(?P<config>[\w.+-]+))?"
                   r"(?::(?P<version>[\d*]+\.[\d*]+\.[\d*]+))?")


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a `tfds:` dataset is, read from its files: enough to read it, and a cache key."""

    dataset: str
    path: pathlib.Path  # <data_dir>/NAME[/CONFIG]/VERSION
    stamp: int  # dataset_info.json's mtime: a re-prepared dataset is read afresh
    image_key: str
    label_key: str
    class_names: tuple[str, ...]
    has_test: bool
    size: tuple[int, int] | None


def _ref(name: str, config: str | None, version: str | None = None) -> str:
    return PREFIX + name + (f"/{config}" if config else "") + (f":{version}" if version else "")


def _listing(refs) -> str:
    return ", ".join(sorted(refs)) if refs else "none"


def _builder_dir(dataset: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory `<data_dir>/NAME[/CONFIG]/VERSION` of a `tfds:` name; each error lists what
    the data dir holds instead."""
    match = _NAME.fullmatch(dataset.removeprefix(PREFIX))
    if match is None:
        raise ValueError(f"data.dataset={dataset!r} is not a TFDS dataset name; write tfds:NAME, "
                         f"tfds:NAME/CONFIG, tfds:NAME:1.2.0 or tfds:NAME/CONFIG:1.2.0.")
    name, config, version = match.group("name", "config", "version")
    root = store.data_root(data_dir).resolve()
    with store.quiet(absl_logging.ERROR):  # TFDS warns about each half-written incomplete.* dir
        variants = (list(file_utils.list_dataset_variants(root / name))
                    if (root / name).is_dir() else [])
        if not variants:
            found = (file_utils.list_datasets_in_data_dir(root) if root.is_dir() else ())
            raise FileNotFoundError(
                f"Dataset {dataset!r}: no prepared TFDS dataset {name!r} in the data dir {root}; "
                f"prepared there: {_listing({_ref(r.dataset_name, r.config) for r in found})}. "
                f"Set data.data_dir (or $CNNJAX_DATA_DIR) to the TFDS data dir that holds it.")
    configs = {v.config for v in variants}
    if config is None and None not in configs:
        default = dataset_builder.load_default_config_name(root / name)  # TFDS records it
        config = default if default in configs or len(configs) > 1 else next(iter(configs))
    if config not in configs:
        asked = f"no config {config!r}" if config else "several configs and no default one"
        raise ValueError(f"Dataset {dataset!r}: {root / name} holds {asked}; choose one of "
                         f"{_listing([_ref(name, c) for c in configs])}.")
    versions = sorted(tfds.core.Version(v.version) for v in variants if v.config == config)
    matching = [v for v in versions if version is None or v.match(version)]
    if not matching:
        raise ValueError(f"Dataset {dataset!r}: no version {version} of {_ref(name, config)} in "
                         f"{root}; choose one of "
                         f"{_listing([_ref(name, config, str(v)) for v in versions])}.")
    return root / name / (config or "") / str(matching[-1])


def _builder(path: pathlib.Path) -> tfds.core.DatasetBuilder:
    with store.quiet(absl_logging.ERROR):
        return tfds.builder_from_directory(path)


def _check_format(info: tfds.core.DatasetInfo, path: pathlib.Path, dataset: str,
                  data_dir: pathlib.Path) -> None:
    formats = info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        name = info.name + (f"/{info.config_name}" if info.config_name else "")
        stored = ", ".join(sorted(f.value for f in formats)) or "tfrecord"
        raise ValueError(f"Dataset {dataset!r}: {path} is stored as {stored} only; cnnjax reads "
                         f"array_record, without TensorFlow. Prepare it again in array_record on a "
                         f"machine with TensorFlow: `tfds.builder({name!r}, "
                         f"data_dir={str(data_dir)!r}).download_and_prepare("
                         f"file_format='array_record')` (see the docs of `tfds.data_source`).")


def _image_key(features: tfds.features.FeaturesDict, dataset: str) -> str:
    """`image`, else the first Image feature or 2-D/3-D Tensor: uint8, with 1 or 3 channels."""
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)
              or (isinstance(f, tfds.features.Tensor) and len(f.shape) in (2, 3))]
    if not images:
        raise ValueError(f"Dataset {dataset!r} has no image feature (tfds.features.Image, or a "
                         f"2-D or 3-D Tensor) among {', '.join(features)}.")
    key = "image" if "image" in images else images[0]
    feature = features[key]
    channels = feature.shape[-1] if len(feature.shape) == 3 else 1
    if feature.np_dtype != np.uint8 or channels not in (1, 3, None):
        raise ValueError(f"Dataset {dataset!r}: feature {key!r} holds {np.dtype(feature.np_dtype)} "
                         f"images shaped {feature.shape}; cnnjax reads uint8 images with 1 or 3 "
                         f"channels.")
    return key


def _label_key(info: tfds.core.DatasetInfo, label: str, dataset: str) -> str:
    """`label` if given, else the supervised label, else `label`; it must be a ClassLabel."""
    supervised = info.supervised_keys[1] if info.supervised_keys else None
    key = label or (supervised if isinstance(supervised, str) else "label")
    labels = [k for k, f in info.features.items() if isinstance(f, tfds.features.ClassLabel)]
    if key not in labels:
        what = "is not a ClassLabel" if key in info.features else "is not one of its features"
        raise ValueError(f"Dataset {dataset!r}: the label feature {key!r} {what}; choose one of "
                         f"its ClassLabel features with --set data.label=NAME: {_listing(labels)}.")
    return key


def _open(cfg: DataConfig) -> tuple[_Source, tfds.core.DatasetBuilder]:
    """The dataset `cfg` names, described from its files, and its builder: a wrong name, config,
    version, format, split or feature is refused here, before any example is read."""
    path = _builder_dir(cfg.dataset, cfg.data_dir)
    builder = _builder(path)
    info = builder.info
    _check_format(info, path, cfg.dataset, store.data_root(cfg.data_dir))
    splits = tuple(info.splits)
    if "train" not in splits:
        raise ValueError(f"Dataset {cfg.dataset!r} has no 'train' split (its splits: "
                         f"{', '.join(splits)}); cnnjax trains on 'train' and tests on 'test' "
                         f"(or a hold-out of 'train').")
    label_key = _label_key(info, cfg.label, cfg.dataset)
    source = _Source(cfg.dataset, path, os.stat(path / "dataset_info.json").st_mtime_ns,
                     _image_key(info.features, cfg.dataset), label_key,
                     tuple(info.features[label_key].names), "test" in splits,
                     store.target_size(cfg.image_size))
    return source, builder


_specs: dict[tuple, datasets.DatasetSpec] = {}  # per process: (source, test fraction) -> spec


def read(cfg: DataConfig) -> stream.Stored:
    """The dataset as a run of `cfg` reads it: each split whole in memory, in stored order (a
    dataset without 'test' tested on the hold-out of 'train'), cached per process with the spec's
    normalization constants per channel over train; or streamed (`_streamed`) when `cfg` asks for
    it or the decoded pixels exceed the budget."""
    source, builder = _open(cfg)
    size = _decoded_bytes(source, builder.info)
    if not stream.wanted(cfg, size):
        splits = {}
        for split in _SPLITS:
            stored = split if source.has_test else "train"
            where = f"Dataset {source.dataset!r} ({source.path}, split {stored!r})"
            splits[split] = store.load(
                builder, split, label_key=source.label_key, image_key=source.image_key,
                holdout=None if source.has_test else cfg.test_fraction, where=where,
                convert=functools.partial(store.conform, size=source.size, where=where),
                fix="" if source.size else "; resize them all with --set data.image_size=H,W")
        key = (source, cfg.test_fraction)
        if key not in _specs:
            train = splits["train"][0]
            mean, std = store.channel_stats(train)
            _specs[key] = datasets.DatasetSpec(source.dataset, len(source.class_names),
                                               tuple(train.shape[1:]), mean, std, _SPLITS, False,
                                               source.class_names)
        return stream.Stored(_specs[key], splits)
    return _streamed(cfg, source, builder.info)


def decoded_bytes(cfg: DataConfig) -> int:
    """Bytes of the dataset's pixels decoded (at `data.image_size`), train and test, from its
    metadata (and one example where the features leave the image size open)."""
    source, builder = _open(cfg)
    return _decoded_bytes(source, builder.info)


def _decoded_bytes(source: _Source, info: tfds.core.DatasetInfo) -> int:
    n = sum(split.num_examples for split in info.splits.values() if split.name in _SPLITS)
    shape = _stored_shape(source, info) or _reader(source, info, "train")[0].shape
    return n * int(np.prod(shape))


# ----------------------------------------------------------------------------- streaming


def _stored_shape(source: _Source, info: tfds.core.DatasetInfo) -> tuple[int, ...] | None:
    """The prepared image shape when the features fix it (after `data.image_size`), else None."""
    shape = tuple(info.features[source.image_key].shape)
    shape = shape if len(shape) == 3 else (*shape, 1)
    if source.size:
        shape = (*source.size, shape[-1])
    return shape if None not in shape else None


def _reader(source: _Source, info: tfds.core.DatasetInfo, split: str) -> store.RecordReader:
    where = f"Dataset {source.dataset!r} ({source.path}, split {split!r})"
    return store.RecordReader(source.path, split, info.splits[split].num_examples,
                              source.image_key,
                              functools.partial(store.conform, size=source.size, where=where))


def _index_dir(cfg: DataConfig, source: _Source) -> pathlib.Path:
    """Where the streaming index of `source` goes: the data dir's cnnjax_stream/, named by what the
    index depends on (the files' stamp among it), so a re-prepared dataset gets a new one."""
    key = json.dumps([PREFIX, *map(str, (source.path, source.stamp, source.image_key,
                                         source.label_key, source.size)), cfg.test_fraction])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", source.dataset.removeprefix(PREFIX)).strip("_")
    return store.data_root(cfg.data_dir) / "cnnjax_stream" / f"{slug}_{digest}"


def _labels(folder: pathlib.Path, source: _Source, split: str) -> np.ndarray:
    """A stored split's labels, read once without decoding images and kept in the index."""
    path = folder / f"labels_{split}.npy"
    if path.exists():
        return np.load(path)
    labels = store.read_labels(source.path, split, source.label_key, source.image_key)
    bad = labels[(labels < 0) | (labels >= len(source.class_names))]
    if bad.size:
        raise ValueError(f"Dataset {source.dataset!r} ({source.path}, split {split!r}): label "
                         f"{int(bad[0])} is out of range [0, {len(source.class_names) - 1}].")
    buffer = io.BytesIO()
    np.save(buffer, labels)
    store.write_small(path, buffer.getvalue())
    return labels


def _streamed(cfg: DataConfig, source: _Source, info: tfds.core.DatasetInfo) -> stream.Stored:
    """The dataset for streaming: each split's records read by index (decoded, and resized with
    `data.image_size`, where they are read). Labels, the hold-out and the spec's statistics come
    from passes over the stored records at first use (cached under the data dir's
    cnnjax_stream/): the splits and spec an in-memory run gets."""
    folder = _index_dir(cfg, source)
    stored = _SPLITS if source.has_test else ("train",)
    readers = {s: _reader(source, info, s) for s in stored}
    shape = _stored_shape(source, info)
    labels = {s: _labels(folder, source, s) for s in stored}
    if source.has_test:
        splits = {s: stream.whole(readers[s], labels[s]) for s in _SPLITS}
    else:  # the stratified hold-out an in-memory run takes (`store.load`)
        mask = store.holdout(labels["train"], cfg.test_fraction)
        rows = {"train": np.flatnonzero(~mask), "test": np.flatnonzero(mask)}
        splits = {s: stream.Split(readers["train"], rows[s], labels["train"][rows[s]])
                  for s in _SPLITS}
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        index = {}
    if "mean" not in index:
        train = splits["train"]
        shape = shape or train.reader[int(train.rows[0])].shape
        stream.notice(f"{cfg.dataset}: reading its {sum(map(len, splits.values()))} images once "
                      f"for their statistics (cached in {folder})")
        hist = np.zeros((shape[-1], 256), np.int64)
        for s, part in splits.items():  # test too: every image is checked once
            hist += stream.scan(part.reader, part.rows, np.full(len(part), s == "train"),
                                shape[-1], workers=cfg.workers, timeout_s=cfg.read_timeout_s,
                                skip_bad=False, what=f"the {s} images of {cfg.dataset}",
                                shape=shape)[0]
        mean, std = store.stats_from_histogram(hist)
        index = {"shape": list(shape), "mean": mean, "std": std}
        store.write_small(folder / "index.json", json.dumps(index).encode())
    spec = datasets.DatasetSpec(source.dataset, len(source.class_names), tuple(index["shape"]),
                                tuple(index["mean"]), tuple(index["std"]), _SPLITS, False,
                                source.class_names)
    return stream.Stored(spec, splits)
