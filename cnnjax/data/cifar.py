"""CIFAR-10 and CIFAR-100 as TFDS builders without TensorFlow, from the archives' binary versions.

`cifar-10-binary.tar.gz` and `cifar-100-binary.tar.gz` (not the python versions, which are pickles)
hold fixed-size records: one label byte (CIFAR-100: two, coarse then fine) and 3,072 pixel bytes,
the red, green and blue 32x32 planes in turn. They are read straight from the tar.gz with `tarfile`,
never extracted. The archive is downloaded by TFDS's download manager and checked against TFDS's
registered size and sha256 (`_ARCHIVES`, the values of TFDS's url_checksums/cifar{10,100}.txt), or
taken from a manual dir (`--manual-dir`): a manual archive whose sha256 differs from the official
one gets a warning naming it, not a refusal (mirrors re-compress archives); its records are checked
either way (every batch present, whole records, labels in range).

Splits: CIFAR-10 train = data_batch_1..5 (50,000), test = test_batch (10,000); CIFAR-100 train.bin
(50,000) and test.bin (10,000), with the fine label as `label` and the superclass as
`coarse_label` (`data.label=coarse`). Records keep the archive's order. Class names are the
official ones (also known before the archive is read); the archive's batches.meta.txt and
fine/coarse_label_names.txt are checked against them, a difference warned about.

The standard CIFAR augmentation is a random crop from the image zero-padded by 4 pixels and a
horizontal flip: `--set augment.crop=4 --set augment.flip=true`, drawn per example from folded keys
like every cnnjax augmentation.
"""

from __future__ import annotations

import pathlib
import tarfile
import zlib
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cnnjax import notices
from cnnjax.data import store

_SIZE = 32
_PIXELS = 3 * _SIZE * _SIZE
_URL = "https://www.cs.toronto.edu/~kriz/"
# archive name -> (size in bytes, sha256), copied from TFDS's url_checksums/cifar{10,100}.txt
_ARCHIVES = {
    "cifar-10-binary.tar.gz":
        (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
    "cifar-100-binary.tar.gz":
        (168513733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm")
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2")


def parse_records(data: bytes, label_bytes: int, where: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N, label_bytes) uint8 labels from one batch file's bytes."""
    record = label_bytes + _PIXELS
    if not data or len(data) % record:
        raise ValueError(f"{where}: {len(data)} bytes is not a whole number of {record}-byte "
                         f"records (truncated or not a CIFAR binary batch); download the archive "
                         f"again.")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, _SIZE, _SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), rows[:, :label_bytes]


def read_archive(path: pathlib.Path, members: dict[str, tuple[str, ...]], names_files: tuple[str, ...]
                 ) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """Each split's batch files' bytes, concatenated in order, and each class-names file's lines,
    read from the tar.gz without extracting it; the error names a missing member."""
    wanted = {m for files in members.values() for m in files} | set(names_files)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                if info.isfile() and info.name in wanted:
                    found[info.name] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a complete tar.gz archive ({e}); download it again.") from e
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{path}: the archive lacks {', '.join(missing)}; it is not the complete "
                         f"{path.name} (download it again).")
    splits = {split: b"".join(found[m] for m in files) for split, files in members.items()}
    names = {f: [line.strip() for line in found[f].decode("utf-8", "replace").splitlines()
                 if line.strip()] for f in names_files}
    return splits, names


class _CifarBuilder(store.ArrayRecordBuilder, skip_registration=True):
    DATASET: ClassVar[str]  # cnnjax's name for it
    ARCHIVE: ClassVar[str]
    PREFIX: ClassVar[str]  # the folder inside the archive
    SPLIT_FILES: ClassVar[dict[str, tuple[str, ...]]]
    NAMES_FILES: ClassVar[dict[str, str]]  # label feature -> its class-names file
    LABEL_BYTES: ClassVar[tuple[str, ...]]  # the label feature of each label byte, in order
    IMAGE_SHAPE = (_SIZE, _SIZE, 3)
    HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

    @tfds.core.utils.classproperty
    @classmethod
    def MANUAL_DOWNLOAD_INSTRUCTIONS(cls) -> str:  # TFDS reads a manual dir only when this is set
        return (f"Download {_URL}{cls.ARCHIVE} on a machine with network and put it, under that "
                f"name, in a directory passed as manual_dir= (--manual-dir on the command line).")

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        size, sha256 = _ARCHIVES[cls.ARCHIVE]
        return {_URL + cls.ARCHIVE: tfds.download.checksums.UrlInfo(
            size=size, checksum=sha256, filename=cls.ARCHIVE)}

    def check_manual_dir(self, manual_dir: pathlib.Path) -> None:
        if not (manual_dir / self.ARCHIVE).is_file():
            raise FileNotFoundError(f"Dataset {self.DATASET!r}: manual dir {manual_dir} lacks "
                                    f"{self.ARCHIVE}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _split_generators(self, dl_manager):
        manual_dir = store.given_manual_dir(dl_manager)
        name = self.DATASET
        if manual_dir is not None:
            self.check_manual_dir(manual_dir)
            path = manual_dir / self.ARCHIVE
            store.warn_if_unofficial({path: _ARCHIVES[self.ARCHIVE][1]}, name)
        else:
            store.check_reachable(name, _URL, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
            path = pathlib.Path(dl_manager.download(_URL + self.ARCHIVE))
        members = {s: tuple(self.PREFIX + f for f in files) for s, files in self.SPLIT_FILES.items()}
        names_files = {k: self.PREFIX + f for k, f in self.NAMES_FILES.items()}
        raw, names = read_archive(path, members, tuple(names_files.values()))
        for feature, file in names_files.items():
            expected = self.LABELS[feature]
            if names[file] != list(expected):
                notices.warn(f"Dataset {name!r}: {path}:{file} names {len(names[file])} classes "
                              f"that are not the official {len(expected)}; cnnjax keeps the "
                              f"official names.")
        splits = {}
        for split, data in raw.items():
            where = f"{path} ({', '.join(members[split])})"
            images, label_rows = parse_records(data, len(self.LABEL_BYTES), where)
            labels = {}
            for column, feature in enumerate(self.LABEL_BYTES):
                values = label_rows[:, column].astype(np.int64)
                if values.max() >= len(self.LABELS[feature]):
                    raise ValueError(f"{where}: label byte {column} holds {values.max()}, but "
                                     f"there are {len(self.LABELS[feature])} classes; the archive "
                                     f"is damaged or not {self.ARCHIVE}.")
                labels[feature] = values
            splits[split] = self._generate_examples(images, labels)
        return splits


class CnnjaxCifar10(_CifarBuilder, skip_registration=True):
    """CIFAR-10: 32x32 colour images in 10 classes, 50,000 train / 10,000 test."""

    name = "cnnjax_cifar10"
    DATASET = "cifar10"
    DESCRIPTION = "CIFAR-10 from its binary archive, stored as uint8 tensors."
    ARCHIVE = "cifar-10-binary.tar.gz"
    PREFIX = "cifar-10-batches-bin/"
    SPLIT_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                   "test": ("test_batch.bin",)}
    NAMES_FILES = {"label": "batches.meta.txt"}
    LABEL_BYTES = ("label",)
    LABELS = {"label": CIFAR10_CLASSES}
    # The training set's per-channel mean and population std, in [0, 1] units.
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)


class CnnjaxCifar100(_CifarBuilder, skip_registration=True):
    """CIFAR-100: 32x32 colour images in 100 classes (20 superclasses), 50,000 / 10,000."""

    name = "cnnjax_cifar100"
    DATASET = "cifar100"
    DESCRIPTION = "CIFAR-100 from its binary archive, stored as uint8 tensors; fine and coarse labels."
    ARCHIVE = "cifar-100-binary.tar.gz"
    PREFIX = "cifar-100-binary/"
    SPLIT_FILES = {"train": ("train.bin",), "test": ("test.bin",)}
    NAMES_FILES = {"label": "fine_label_names.txt", "coarse_label": "coarse_label_names.txt"}
    LABEL_BYTES = ("coarse_label", "label")
    LABELS = {"label": CIFAR100_CLASSES, "coarse_label": CIFAR100_SUPERCLASSES}
    LABEL_ALIASES = {"fine": "label", "coarse": "coarse_label"}
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)


BUILDERS: dict[str, type[store.ArrayRecordBuilder]] = {
    "cifar10": CnnjaxCifar10, "cifar100": CnnjaxCifar100}
