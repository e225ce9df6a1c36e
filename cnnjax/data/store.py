"""Prepared datasets on disk: TFDS builders that write array_record files, read back whole through
`data_source`, with no TensorFlow anywhere.

Every TFDS-backed dataset of cnnjax (cnnjax/data/mnist.py, cifar.py, imagefolder.py) is an
`ArrayRecordBuilder`: uint8 `tfds.features.Tensor` images (TensorFlow-free to encode and decode)
and `ClassLabel` labels, records in source order (TFDS's key shuffling is off), prepared once under
`<data_dir>/<builder name>/<version>/`. A failed preparation leaves nothing taken as prepared: TFDS
writes into an `incomplete.*` directory that it removes on error and renames only on success.
`read_split` also reads datasets prepared elsewhere in array_record (cnnjax/data/tfds_prepared.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import pathlib
import socket
import threading
import urllib.parse
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from cnnjax import notices


def default_data_dir() -> pathlib.Path:
    """Where prepared datasets live: $CNNJAX_DATA_DIR if set, else ~/.cache/cnnjax/tfds."""
    env = os.environ.get("CNNJAX_DATA_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "cnnjax" / "tfds"


def data_root(data_dir: str | os.PathLike | None) -> pathlib.Path:
    return pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


@contextlib.contextmanager
def quiet(level: int = absl_logging.WARNING):
    """TFDS's progress bars and logs below `level` off; cnnjax shows its own progress."""
    tfds.disable_progress_bar()  # process-wide: TFDS has no way to read the previous setting
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(level)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def examples(images: np.ndarray, labels: Mapping[str, np.ndarray], keys=None
             ) -> Iterator[tuple[int, dict]]:
    """(key, record) pairs: one image and every label feature of each example, in order."""
    keys = range(len(images)) if keys is None else keys
    for i, key in enumerate(keys):
        yield int(key), {"image": images[i], **{k: int(v[i]) for k, v in labels.items()}}


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """cnnjax's builders' common ground: array_record files in source order, no TFDS registry entry.

    `skip_registration` and the `cnnjax_` names keep these apart from TFDS's own builders (which
    read and decode through TensorFlow), in the registry and on disk alike. A subclass states its
    `IMAGE_SHAPE` and `LABELS` (label feature -> class names, or a class count) and writes
    `_split_generators`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: uint8 Tensor images, ClassLabel labels."}
    DESCRIPTION: ClassVar[str]
    HOMEPAGE: ClassVar[str]
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]]
    LABELS: ClassVar[Mapping[str, int | Sequence[str]]] = {"label": 10}
    LABEL_ALIASES: ClassVar[Mapping[str, str]] = {}  # other names data.label may give a feature
    MEAN: ClassVar[float | tuple[float, ...]]  # normalization constants, in [0, 1] units
    STD: ClassVar[float | tuple[float, ...]]
    NEEDS_DOWNLOAD: ClassVar[bool] = True

    # TFDS's default looks for a checksums file beside the module through `code_path`, which needs
    # `importlib_resources` (not installed); each builder states its checksums here instead.
    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        return {}

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.IMAGE_SHAPE)

    def _features(self) -> tfds.features.FeaturesDict:
        # Tensor, not tfds.features.Image: Image needs TensorFlow to encode a numpy array.
        labels = {k: tfds.features.ClassLabel(num_classes=v) if isinstance(v, int)
                  else tfds.features.ClassLabel(names=list(v)) for k, v in self.LABELS.items()}
        return tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.image_shape(), dtype=np.uint8), **labels})

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=self._features(), supervised_keys=("image", "label"),
                                     homepage=self.HOMEPAGE, disable_shuffling=True)

    def prepare(self, manual_dir: str | os.PathLike | None = None) -> None:
        """Writes the dataset's files (once), from `manual_dir` if given, else by downloading."""
        if manual_dir is not None:
            manual_dir = pathlib.Path(manual_dir).expanduser()
            self.check_manual_dir(manual_dir)
        self.download_and_prepare(download_config=download_config(manual_dir))

    def check_manual_dir(self, manual_dir: pathlib.Path) -> None:
        """Refuses a manual dir that lacks a file, naming it (a subclass's own rule)."""

    def _generate_examples(self, images, labels, keys=None):
        labels = labels if isinstance(labels, Mapping) else {"label": labels}
        return examples(images, labels, keys)


def given_manual_dir(dl_manager) -> pathlib.Path | None:
    """The manual dir TFDS hands `_split_generators`, or None when there is none (or an empty one:
    then the builder downloads)."""
    try:
        return dl_manager.manual_dir
    except AssertionError:
        return None


def download_config(manual_dir) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=False,  # our builders are not on TFDS's GCS bucket; skip the network probe
        force_checksums_validation=True)  # a download without a registered checksum is an error


def check_reachable(dataset: str, url: str, instructions: str, timeout_s: float = 5.0) -> None:
    """Fails in seconds when offline, where TFDS's download retries would take minutes."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise FileNotFoundError(f"Dataset {dataset!r} is not prepared and {parts.hostname} cannot "
                                f"be reached ({e}). {instructions}") from e


def sha256(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warn_if_unofficial(files: Mapping[os.PathLike, str], dataset: str) -> None:
    """One warning naming each manual-dir file whose sha256 is not its official file's.

    Not a refusal: mirrors re-compress archives, so a good copy can differ byte for byte; the
    content checks of each builder (sizes, headers, labels) still apply.
    """
    odd = [os.fspath(path) for path, official in files.items() if sha256(path) != official]
    if odd:
        notices.warn(f"Dataset {dataset!r}: {', '.join(odd)} {'is' if len(odd) == 1 else 'are'} "
                      f"not byte-identical to the official file{'s' if len(odd) > 1 else ''} "
                      f"(sha256 differs); a mirror's re-compressed copy is fine, anything else "
                      f"may not be the data you mean.")


# ----------------------------------------------------------------------------- reading

_READ_CHUNK = 10_000  # records per __getitems__ call: bounds the list of dicts held at once
_CACHE_SIZE = 8  # splits held in memory; full MNIST train is 47 MB, CIFAR-10 train 154 MB
_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # insertion-ordered: oldest first
_cache_lock = threading.Lock()


def _cached(key: tuple, read: Callable[[], Any]) -> Any:
    """`read()`'s arrays, shared by later calls with the same key (include a stamp of the files)."""
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    arrays = read()
    with _cache_lock:
        _cache[key] = arrays
        while len(_cache) > _CACHE_SIZE:
            del _cache[next(iter(_cache))]
    return arrays


def read_split(source, where: str, *, num_classes: int, image_key: str = "image",
               label_key: str = "label", image_shape: tuple[int, ...] | None = None,
               convert: Callable[[np.ndarray, int], np.ndarray] | None = None,
               fix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A whole split of a TFDS data source: read-only uint8 (N, H, W, C) images and int32 labels.

    Every image must have `image_shape` (by default the first one's) after `convert(image, index)`
    (`conform`, say); the error names the first that does not and `fix`, what to do about it.
    """
    n = len(source)
    images = labels = None
    for start in range(0, n, _READ_CHUNK):
        stop = min(start + _READ_CHUNK, n)
        records = source.__getitems__(list(range(start, stop)))
        chunk = []
        for i, record in enumerate(records, start):
            image = np.asarray(record[image_key])
            image = convert(image, i) if convert is not None else image
            if image.ndim == 2:
                image = image[..., None]
            if image_shape is None:
                image_shape = image.shape
            if image.shape != tuple(image_shape) or image.dtype != np.uint8:
                raise ValueError(f"{where}: example {i} is a {image.dtype} image shaped "
                                 f"{image.shape}, expected uint8 {tuple(image_shape)}{fix}.")
            chunk.append(image)
        if images is None:
            images = np.empty((n, *image_shape), np.uint8)
            labels = np.empty((n,), np.int32)
        images[start:stop] = np.stack(chunk)
        labels[start:stop] = [record[label_key] for record in records]
    if images is None:
        raise ValueError(f"{where}: the split is empty.")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"{where}: label {int(bad[0])} is out of range; labels must be in "
                         f"[0, {num_classes - 1}] ({bad.size} labels are not).")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder):
    """One process at a time prepares a dataset: two runs started together on a fresh data dir
    would otherwise race to rename the same TFDS output. The lock (fcntl, released by the kernel
    when a holder dies) is a file of the data dir named after the dataset's folder."""
    root = pathlib.Path(builder.data_dir_root)
    root.mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(builder.data_path).parent.relative_to(root)
    fd = os.open(root / f".{'.'.join(folder.parts)}.prepare.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_prepared(builder: tfds.core.DatasetBuilder,
                    prepare: Callable[[], None] | None = None) -> None:
    """Prepares `builder`'s dataset (`prepare()`) unless it is; one process at a time."""
    with quiet():
        with quiet(absl_logging.ERROR):  # a dataset not yet prepared is no cause for a warning
            prepared = builder.is_prepared()
        if not prepared:
            if prepare is None:
                raise FileNotFoundError(f"{builder.data_path} is not prepared.")
            with _preparing(builder):
                with quiet(absl_logging.ERROR):
                    prepared = builder.is_prepared()  # by the process that held the lock
                if prepared:  # this builder's info was read before those files existed
                    builder.info.read_from_directory(builder.data_path)
                else:
                    prepare()


def load(builder: tfds.core.DatasetBuilder, split: str, *, label_key: str = "label",
         prepare: Callable[[], None] | None = None, holdout: float | None = None,
         where: str | None = None, **read_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """One split of `builder`'s dataset, prepared first (`prepare()`) if it is not yet; cached per
    process. With `holdout`, the dataset has no 'test': 'test' is the stratified hold-out
    (`holdout()`) of that fraction of the stored 'train', and 'train' the rest. `where` names the
    stored split in errors; `read_kwargs` go to `read_split`."""
    ensure_prepared(builder, prepare)
    stored = split if holdout is None else "train"
    with quiet():
        # The info file's mtime tells a re-prepared dataset from the one that was cached.
        stamp = os.stat(builder.data_path / "dataset_info.json").st_mtime_ns
        key = (os.fspath(pathlib.Path(builder.data_path).resolve()), label_key, stamp,
               tuple(sorted((k, repr(v)) for k, v in read_kwargs.items())))
        feature = builder.info.features[label_key]
        where = where or f"{builder.data_path} (split {stored!r})"

        def read():
            with quiet(absl_logging.ERROR):  # TFDS warns that it decodes with Pillow, not OpenCV
                source = builder.as_data_source(stored, file_format="array_record")
                return read_split(source, where, num_classes=feature.num_classes,
                                  label_key=label_key, **read_kwargs)

        arrays = _cached(key + (stored,), read)
    if holdout is None:
        return arrays
    return _cached(key + (split, holdout), lambda: _held_out(*arrays, holdout, split))


def _held_out(images: np.ndarray, labels: np.ndarray, fraction: float, split: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """'test', the stratified hold-out of a stored 'train' (`holdout`), or 'train', the rest."""
    mask = holdout(labels, fraction)
    keep = mask if split == "test" else ~mask
    part = images[keep], labels[keep]
    for array in part:
        array.flags.writeable = False
    return part


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _length_fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in
    buf[start:end]; fields of other wire types are stepped over."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 2:
            n, i = _varint(buf, i)
            yield key >> 3, i, i + n
            i += n
        elif wire == 0:
            i = _varint(buf, i)[1]
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"protobuf wire type {wire}")


def _packed_values(record: bytes, key: bytes) -> tuple[int, int] | None:
    """Where the packed int64 values of feature `key` lie in a serialized tf.train.Example
    (Example: 1 features; Features: 1 entries; entry: 1 key, 2 Feature; Feature: 3 int64_list;
    Int64List: 1 packed values), or None where the record is laid out otherwise."""
    for field, start, end in _length_fields(record, 0, len(record)):
        if field != 1:
            continue
        for entry, entry_start, entry_end in _length_fields(record, start, end):
            parts = {f: (a, b) for f, a, b in _length_fields(record, entry_start, entry_end)}
            if entry == 1 and 2 in parts and 1 in parts and record[slice(*parts[1])] == key:
                lists = {f: (a, b) for f, a, b in _length_fields(record, *parts[2])}
                values = {f: (a, b) for f, a, b in _length_fields(record, *lists[3])} \
                    if 3 in lists else {}
                return values.get(1)
    return None


def packed_uint8(records: Sequence[bytes], key: bytes, shape: tuple[int, ...]
                 ) -> np.ndarray | None:
    """(N, *shape) uint8: the Tensor feature `key` that TFDS wrote into each serialized
    tf.train.Example as an int64_list of packed varints, decoded with NumPy for the whole batch
    at once; None where a record is laid out otherwise (TFDS then decodes them).

    A value below 128 is one byte; from 128 to 255 it is two, the value itself and then 0x01, so
    decoding drops each byte that follows one of 128 or more. TFDS's decoder parses every varint
    into a protobuf list and converts it element by element: 43 us a CIFAR-shaped image against
    12 here, and with it a streamed run fell short of the in-memory one (benchmarks/
    stream_throughput.py, seed CNN, batch 128, 2 shared AMD EPYC cores: 0.77x with 0 workers,
    0.84x with 2; with this decode 0.91-1.00x and 0.90-1.05x)."""
    spans = [_packed_values(record, key) for record in records]
    if not records or None in spans:
        return None
    data = np.frombuffer(b"".join(memoryview(r)[a:b] for r, (a, b) in zip(records, spans)),
                         np.uint8)
    high = data >= 0x80
    lengths = np.array([b - a for a, b in spans])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if high[-1] or not np.all(~high[:-1] | (data[1:] == 1)):
        return None  # a value beyond 255: not a uint8 feature
    if (lengths - np.add.reduceat(high, starts, dtype=np.int64) != math.prod(shape)).any():
        return None  # another number of values than the feature's shape holds
    first = np.ones(len(data), bool)  # the first byte of each varint: its value
    first[1:] = ~high[:-1]
    return np.compress(first, data).reshape(len(records), *shape)


class RecordReader:
    """Random access to the images of a prepared array_record split, for streaming:
    `reader[row]` is its (H, W, C) uint8 image (after `convert(image, row)`), decoded by TFDS;
    `reader._getitems(rows)` reads several at once (grain's batched read; array_record reads them
    in parallel). The data source is opened in each process on first use, so grain's worker
    processes each get their own (the reader pickles as its path)."""

    def __init__(self, path: os.PathLike | str, split: str, length: int, image_key: str = "image",
                 convert: Callable[[np.ndarray, int], np.ndarray] | None = None):
        self.path, self.split, self.length = os.fspath(path), split, length
        self.image_key, self.convert = image_key, convert
        self._source = self._shape = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_shape": None}

    def __len__(self) -> int:
        return self.length

    def _open(self):
        if self._source is None:
            with quiet(absl_logging.ERROR):  # TFDS notes that it decodes with Pillow
                self._source = tfds.builder_from_directory(self.path).as_data_source(
                    self.split, file_format="array_record")
            feature = self._source.dataset_info.features[self.image_key]
            fixed = (isinstance(feature, tfds.features.Tensor) and feature.np_dtype == np.uint8
                     and None not in feature.shape)
            self._shape = tuple(feature.shape) if fixed else None  # `packed_uint8`'s, if it applies
        return self._source

    def _decode(self, raw: bytes, row: int) -> np.ndarray:
        image = np.asarray(self._source.dataset_info.features.deserialize_example_np(raw)
                           [self.image_key])
        image = self.convert(image, row) if self.convert is not None else image
        return image[..., None] if image.ndim == 2 else image

    def __getitem__(self, row: int) -> np.ndarray:
        return self._decode(self._open().data_source[row], row)

    def _getitems(self, rows: Sequence[int]) -> Sequence[np.ndarray]:
        raws = self._open().data_source.__getitems__(list(rows))
        if self._shape is not None and self.convert is None:
            images = packed_uint8(raws, self.image_key.encode(), self._shape)
            if images is not None:  # a list, as grain takes it: views of one array
                return list(images if images.ndim == 4 else images[..., None])
        return [self._decode(raw, row) for raw, row in zip(raws, rows)]


def read_labels(path: os.PathLike | str, split: str, label_key: str, image_key: str = "image"
                ) -> np.ndarray:
    """A prepared array_record split's labels (int32), read without decoding the images; cached
    per process and stamp of the files."""
    stamp = os.stat(pathlib.Path(path) / "dataset_info.json").st_mtime_ns

    def read():
        with quiet(absl_logging.ERROR):
            builder = tfds.builder_from_directory(os.fspath(path))
            source = builder.as_data_source(split, file_format="array_record",
                                            decoders={image_key: tfds.decode.SkipDecoding()})
        n = len(source)
        labels = np.empty(n, np.int32)
        for start in range(0, n, _READ_CHUNK):
            records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, n))))
            labels[start:start + len(records)] = [record[label_key] for record in records]
        return labels

    return _cached((os.fspath(path), split, label_key, stamp, "labels"), read)


def write_small(path: pathlib.Path, content: bytes) -> bool:
    """Writes a small cache file atomically (a temporary file renamed); False, and nothing
    written, where the directory is not writable (a shared, read-only data dir)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(content)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A seeded, stratified hold-out mask: in each class, round(fraction * n) examples chosen by
    `np.random.default_rng([seed, class])`, so the test split of a dataset without one is fixed
    by the data alone (never by the run's seed) and has every class in proportion."""
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = int(round(fraction * len(rows)))
        mask[np.random.default_rng([seed, int(c)]).permutation(rows)[:n]] = True
    return mask


def conform(image: np.ndarray, index: int, *, size: tuple[int, int] | None, where: str
            ) -> np.ndarray:
    """A decoded image of a dataset prepared elsewhere as cnnjax reads it: (H, W, C) with 1 or 3
    channels, resized to `size` if given (`read_split`'s and `RecordReader`'s `convert`)."""
    image = image[..., None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: example {index} is shaped {image.shape}; cnnjax reads images "
                         f"with 1 or 3 channels.")
    return resize(image, size) if size else image


def target_size(image_size: Sequence[int]) -> tuple[int, int] | None:
    """`data.image_size` as (height, width): (H, W), or (S,) for S x S; None keeps stored sizes."""
    return (image_size[0], image_size[-1]) if image_size else None


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, C) uint8 image resized to (height, width) with Pillow's antialiased bicubic
    filter (torchvision's Resize on PIL images); unchanged when it already has that size."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BICUBIC))
    return out[..., None] if squeeze else out


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std over all pixels of (N, H, W, C) pixel-unit images,
    in [0, 1] units. uint8 images: exact, from per-channel value counts (`pixel_histogram`), in
    chunks, so a split streamed batch by batch (cnnjax/data/stream.py) gets the very same numbers
    as one held whole; float images: two float64 passes in chunks, never copied whole."""
    if images.dtype == np.uint8:
        hist = sum((pixel_histogram(images[s:s + _HIST_CHUNK])
                    for s in range(0, len(images), _HIST_CHUNK)),
                   np.zeros((images.shape[-1], 256), np.int64))
        return stats_from_histogram(hist)
    c, chunk = images.shape[-1], 4096
    parts = lambda: (images[s:s + chunk].reshape(-1, c).astype(np.float64)
                     for s in range(0, len(images), chunk))
    count = images.size // c
    mean = sum(x.sum(0) for x in parts()) / count
    var = sum(np.square(x - mean).sum(0) for x in parts()) / count
    return tuple(map(float, mean / 255.0)), tuple(map(float, np.sqrt(var) / 255.0))


_HIST_CHUNK = 512  # images per count: bounds the int64 copy bincount makes


def pixel_histogram(images: np.ndarray) -> np.ndarray:
    """(C, 256) int64: how many pixels of each channel of uint8 (..., C) images hold each value.
    Counts add up across chunks, workers and processes in any order."""
    c = images.shape[-1]
    codes = images.reshape(-1, c).astype(np.intp) + np.arange(c) * 256
    return np.bincount(codes.ravel(), minlength=256 * c).reshape(c, 256).astype(np.int64)


def stats_from_histogram(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std in [0, 1] units from `pixel_histogram` counts, with
    integer sums: the mean is the correctly rounded quotient (as a float64 sum of the pixels gives
    it), the variance (n * sum x^2 - (sum x)^2) / n^2 rounded once before its square root."""
    means, stds = [], []
    for counts in hist.tolist():
        n = sum(counts)
        s1 = sum(k * v for v, k in enumerate(counts))
        s2 = sum(k * v * v for v, k in enumerate(counts))
        means.append(s1 / n / 255.0)
        stds.append(math.sqrt((n * s2 - s1 * s1) / (n * n)) / 255.0)
    return tuple(means), tuple(stds)
