"""`imagefolder:PATH`: a folder of PNG/JPEG images, one subfolder per class, as a prepared dataset.

Layout: `PATH/<class>/...`, or `PATH/train/<class>/...` with `PATH/test/<class>/...` holding the
same classes. Classes are the subfolder names, sorted, labelled 0..K-1 in that order; files are
read in sorted path order (subfolders of a class folder too); hidden files and folders (`.DS_Store`)
are skipped, any other file that is not .png/.jpg/.jpeg is an error rather than silently left out.
Without train/test folders the test split is `store.holdout(labels, data.test_fraction)`:
stratified, and fixed by the data alone, never by the run's seed.

Pixels are decoded by Pillow (no TensorFlow): 3 channels if any image is colour (RGB; alpha
dropped, palettes expanded), else 1 (grayscale). With `data.image_size` every image is resized to
it (`store.resize`, Pillow's antialiased bicubic); without it the images must all have one size.

Prepared once, like the built-in datasets, under `<data_dir>/cnnjax_imagefolder/<folder>_<hash>/`:
one TFDS config per (folder, image size, test fraction), so folders never collide. The prepared
copy keeps a fingerprint of the folder (its files' relative paths, sizes and mtimes); when the
folder no longer matches it, the copy is deleted and prepared again. Scanning costs one `stat` per
file on every load; decoding happens only when preparing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from PIL import Image

from cnnjax.config import DataConfig
from cnnjax.data import datasets, store, stream

PREFIX = "imagefolder:"
_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "test")
# Pillow modes taken as they are, grayscale or colour; others (16-bit, float) are refused.
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})

_specs: dict[tuple, datasets.DatasetSpec] = {}  # per process: (dataset, prepared copy) -> spec


@dataclasses.dataclass(frozen=True)
class _Folder:
    """What a scan of PATH found: the classes and each split's files (sorted) and labels."""

    root: pathlib.Path
    classes: tuple[str, ...]
    files: Mapping[str, tuple[pathlib.Path, ...]]
    labels: Mapping[str, np.ndarray]
    has_split_folders: bool
    fingerprint: str


# ----------------------------------------------------------------------------- scanning

def _root(cfg: DataConfig) -> pathlib.Path:
    raw = cfg.dataset[len(PREFIX):]
    if not raw:
        raise ValueError(f"data.dataset={cfg.dataset!r} names no folder; give imagefolder:PATH, "
                         f"PATH a folder with one subfolder of images per class.")
    root = pathlib.Path(raw).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.dataset={cfg.dataset!r}: {root} does not exist; give the "
                                f"path of a folder with one subfolder of images per class.")
    if not root.is_dir():
        raise ValueError(f"data.dataset={cfg.dataset!r}: {root} is not a folder; give the path of "
                         f"a folder with one subfolder of images per class.")
    return root.resolve()


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in _EXTENSIONS


def _class_dirs(where: pathlib.Path) -> dict[str, pathlib.Path]:
    """The class folders of `where` by name, sorted; an image outside them is an error (it would
    have no label), other files beside them are left alone (a README, a licence)."""
    entries = sorted(p for p in where.iterdir() if not p.name.startswith("."))
    stray = [p for p in entries if p.is_file() and _is_image(p)]
    if stray:
        raise ValueError(f"{stray[0]} is outside any class folder, so it has no class; move it "
                         f"into {where}/<class>/.")
    dirs = {p.name: p for p in entries if p.is_dir()}
    if not dirs:
        raise ValueError(f"{where} holds no class folders; put each class's images in a subfolder "
                         f"named after the class ({where}/<class>/image.png).")
    return dirs


def _images(class_dir: pathlib.Path) -> list[pathlib.Path]:
    """The images of one class folder and its subfolders, in sorted path order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = pathlib.Path(dirpath) / name
            if not _is_image(path):
                raise ValueError(f"{path} is not a PNG or JPEG image (by its name: imagefolder "
                                 f"reads {', '.join(_EXTENSIONS)}); convert it, move it out of "
                                 f"{class_dir.parent}, or hide it (a name starting with '.').")
            files.append(path)
    if not files:
        raise ValueError(f"class folder {class_dir} holds no images; add some or remove it.")
    return sorted(files)


def _labelled(dirs: Mapping[str, pathlib.Path], classes: tuple[str, ...]
              ) -> tuple[tuple[pathlib.Path, ...], np.ndarray]:
    pairs = [(f, c) for c, name in enumerate(classes) for f in _images(dirs[name])]
    return tuple(f for f, _ in pairs), np.array([c for _, c in pairs], np.int64)


def _fingerprint(root: pathlib.Path, files: list[pathlib.Path]) -> str:
    """A hash of the files' relative paths, sizes and mtimes: changes when the folder does."""
    digest = hashlib.sha256()
    for path in sorted(files):
        st = path.stat()
        digest.update(os.fsencode(path.relative_to(root)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def _scan(cfg: DataConfig) -> _Folder:
    """The folder's classes and splits (see the module docstring); every layout error is raised
    here, before any image is decoded."""
    root = _root(cfg)
    top = _class_dirs(root)
    present = [s for s in _SPLITS if s in top]
    if present:
        others = sorted(set(top) - set(_SPLITS))
        missing = [s for s in _SPLITS if s not in top]
        if missing or others:
            raise ValueError(
                f"{root} has a {present[0]}/ folder, so it must hold exactly train/ and test/, "
                f"each with one folder per class; "
                + (f"add {root / missing[0]}/." if missing else
                   f"move {', '.join(others)} out of it, or into train/ and test/."))
        dirs = {s: _class_dirs(root / s) for s in _SPLITS}
        if set(dirs["train"]) != set(dirs["test"]):
            only = {s: sorted(set(dirs[s]) - set(dirs[t])) for s, t in (_SPLITS, _SPLITS[::-1])}
            raise ValueError(f"{root}: train/ and test/ must hold the same class folders; only in "
                             f"train/: {only['train'] or 'none'}, only in test/: "
                             f"{only['test'] or 'none'}. Add or remove folders so they match.")
        classes = tuple(sorted(dirs["train"]))
        split = {s: _labelled(dirs[s], classes) for s in _SPLITS}
    else:
        classes = tuple(sorted(top))
        files, labels = _labelled(top, classes)
        test = store.holdout(labels, cfg.test_fraction)
        if test.all() or not test.any():
            raise ValueError(f"{root}: data.test_fraction={cfg.test_fraction} of {len(files)} "
                             f"images in {len(classes)} classes leaves an empty split; add images, "
                             f"change the fraction, or give train/ and test/ folders.")
        split = {s: (tuple(np.asarray(files, object)[keep]), labels[keep])
                 for s, keep in (("train", ~test), ("test", test))}
    everything = [f for files, _ in split.values() for f in files]
    return _Folder(root, classes, {s: f for s, (f, _) in split.items()},
                   {s: y for s, (_, y) in split.items()}, bool(present),
                   _fingerprint(root, everything))


# ----------------------------------------------------------------------------- pixels

_SKIP_HINT = "replace or remove it, or --set data.on_bad_image=skip to leave such files out"


def _header(path: pathlib.Path) -> tuple[str, tuple[int, int]]:
    """(Pillow mode, (height, width)) from the file's header, without decoding its pixels."""
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path} cannot be read as an image ({e}); {_SKIP_HINT}.") from e
    if mode not in _GRAY_MODES | _COLOUR_MODES:
        raise ValueError(f"{path} is a mode-{mode} image (16-bit or float); imagefolder reads "
                         f"8-bit grayscale, RGB(A) and palette images: save it as an 8-bit PNG "
                         f"or JPEG.")
    return mode, (height, width)


def _readable_header(path: pathlib.Path, skip_bad: bool) -> tuple[str, tuple[int, int]] | None:
    """`_header`, or None for a file that is no image at all when such files are skipped."""
    try:
        return _header(path)
    except ValueError as err:
        if skip_bad and isinstance(err.__cause__, (OSError, SyntaxError, ValueError)):
            return None
        raise


def _prepared_shape(folder: _Folder, size: tuple[int, int] | None, skip_bad: bool = False
                    ) -> tuple[tuple[int, int, int], tuple[pathlib.Path, ...]]:
    """((H, W, C) of the prepared images, the files that are no image), from the files' headers:
    C = 3 if any image is colour, else 1; (H, W) = `size`, or the images' one size (the error
    names the first file of another size). Unreadable files raise unless `skip_bad`."""
    first, colour, bad = None, False, []
    for path in sorted(f for files in folder.files.values() for f in files):
        header = _readable_header(path, skip_bad)
        if header is None:
            bad.append(path)
            continue
        mode, hw = header
        colour = colour or mode in _COLOUR_MODES
        if first is None:
            first = (path, hw)
        elif size is None and hw != first[1]:
            raise ValueError(f"{path} is {hw[0]}x{hw[1]} (height x width) but {first[0]} is "
                             f"{first[1][0]}x{first[1][1]}; to resize every image to one size, "
                             f"--set data.image_size=H,W (or S for S x S).")
    if first is None:
        raise ValueError(f"{folder.root} holds no readable image; replace its files.")
    return (*(size or first[1]), 3 if colour else 1), tuple(bad)


def _decode(path: pathlib.Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One file as an (H, W, C) uint8 array: Pillow's decode, converted to RGB or grayscale ('L'),
    then resized to `size` if it differs."""
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except (OSError, SyntaxError, ValueError) as e:  # a truncated or damaged file
        raise ValueError(f"{path} cannot be decoded as an image ({e}); {_SKIP_HINT}.") from e
    return store.resize(image if image.ndim == 3 else image[..., None], size)


class FolderReader:
    """Random access to a split's files for streaming: `reader[i]` is file i decoded and resized
    (`_decode`) where it is read, in a grain worker or the main process."""

    def __init__(self, files: Sequence[pathlib.Path], channels: int, size: tuple[int, int]):
        self.files = tuple(os.fspath(f) for f in files)
        self.channels, self.size = channels, tuple(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return _decode(pathlib.Path(self.files[i]), self.channels, self.size)

    def _getitems(self, rows: Sequence[int]) -> list[np.ndarray]:
        return [self[i] for i in rows]


def _relative(folder: _Folder, paths) -> list[str]:
    return [os.fspath(pathlib.Path(p).relative_to(folder.root)) for p in paths]


def _check_skipped(cfg: DataConfig, folder: _Folder, skipped: Sequence[str]) -> None:
    """A copy made with `data.on_bad_image=skip` left files out: an 'error' run names them."""
    if skipped and cfg.on_bad_image == "error":
        names = ", ".join(os.fspath(folder.root / f) for f in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise ValueError(f"{names}{more} cannot be decoded as images; {_SKIP_HINT}.")


# ----------------------------------------------------------------------------- preparing

class CnnjaxImageFolder(store.ArrayRecordBuilder, skip_registration=True):
    """One scanned folder at one size and split rule, written as a TFDS config of its own.
    Files that are no image (`not_images`) and, with `skip_bad`, files that fail to decode are
    left out; metadata.json lists them (`skipped`, relative to the folder)."""

    name = "cnnjax_imagefolder"
    DESCRIPTION = "A folder of PNG/JPEG images, one subfolder per class, stored as uint8 tensors."
    NEEDS_DOWNLOAD = False

    def __init__(self, *, folder: _Folder, image_shape: tuple[int, int, int],
                 config: tfds.core.BuilderConfig, skip_bad: bool = False,
                 not_images: Sequence[pathlib.Path] = (), **kwargs):
        # Per instance, not per class: a folder's shape and classes are known only from its scan.
        self.folder = folder
        self.IMAGE_SHAPE = image_shape
        self.LABELS = {"label": folder.classes}
        self.skip_bad, self.not_images = skip_bad, frozenset(not_images)
        self.skipped = list(not_images)
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # The fingerprint goes to metadata.json beside the records: `_builder` compares it.
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=self._features(),
            supervised_keys=("image", "label"), homepage=self.folder.root.as_uri(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(fingerprint=self.folder.fingerprint, skipped=[]))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(self.folder.files[s], self.folder.labels[s])
                for s in _SPLITS}

    def _generate_examples(self, files: Sequence[pathlib.Path], labels: np.ndarray
                           ) -> Iterator[tuple[int, dict]]:
        for key, (path, label) in enumerate(zip(files, labels)):
            if path in self.not_images:
                continue
            try:
                image = _decode(path, self.IMAGE_SHAPE[-1], self.IMAGE_SHAPE[:2])
            except ValueError:
                if not self.skip_bad:
                    raise
                self.skipped.append(path)
                continue
            yield key, {"image": image, "label": int(label)}
        # written with the info once every split is generated
        self.info.metadata["skipped"] = sorted(_relative(self.folder, self.skipped))


def _builder_config(folder: _Folder, size: tuple[int, int] | None, test_fraction: float
                   ) -> tfds.core.BuilderConfig:
    """The config that names the prepared copy: the folder's path, the size and (for a folder
    without train/test) the test fraction, hashed, after the folder's name for a reader."""
    settings = {"folder": os.fspath(folder.root), "image_size": size,
                "test_fraction": None if folder.has_split_folders else test_fraction}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", folder.root.name).strip("_") or "root"
    return tfds.core.BuilderConfig(name=f"{slug}_{digest}", description=json.dumps(settings))


def _stored_metadata(path: pathlib.Path) -> dict:
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        return metadata if isinstance(metadata, dict) else {}
    except (OSError, ValueError):
        return {}


def _config_dir(cfg: DataConfig, folder: _Folder) -> pathlib.Path:
    """Where the folder's prepared copy (`<version>/`) and its streaming index live."""
    config = _builder_config(folder, store.target_size(cfg.image_size), cfg.test_fraction)
    return store.data_root(cfg.data_dir) / CnnjaxImageFolder.name / config.name


def _prepared_path(cfg: DataConfig, folder: _Folder) -> pathlib.Path:
    return _config_dir(cfg, folder) / str(CnnjaxImageFolder.VERSION)


def _builder(cfg: DataConfig, folder: _Folder) -> tfds.core.DatasetBuilder:
    """A reader of the prepared copy if it matches the folder; else (deleting a stale copy) a
    `CnnjaxImageFolder` to prepare it, after the header pass that fixes the image shape."""
    size = store.target_size(cfg.image_size)
    config = _builder_config(folder, size, cfg.test_fraction)
    data_dir = store.data_root(cfg.data_dir)
    path = _prepared_path(cfg, folder)
    with store.quiet(absl_logging.ERROR):  # TFDS warns about every config not in the class
        if (path / "dataset_info.json").exists():
            metadata = _stored_metadata(path)
            if metadata.get("fingerprint") == folder.fingerprint:
                _check_skipped(cfg, folder, metadata.get("skipped") or [])
                return tfds.builder_from_directory(path)
            shutil.rmtree(path)
        headers = _headers(cfg, folder)
        return CnnjaxImageFolder(folder=folder, image_shape=tuple(headers["shape"]),
                                 config=config, skip_bad=cfg.on_bad_image == "skip",
                                 not_images=[folder.root / f for f in headers["not_images"]],
                                 data_dir=os.fspath(data_dir))


def read(cfg: DataConfig) -> stream.Stored:
    """The folder as a run of `cfg` reads it: its prepared copy (prepared first if the folder has
    none that matches) read whole into memory, in sorted path order, or its files streamed
    (`_streamed`) when `cfg` asks for it or their decoded pixels exceed the budget."""
    folder = _scan(cfg)
    size = _decoded_bytes(cfg, folder)
    if stream.wanted(cfg, size):
        return _streamed(cfg, folder)
    builder = _builder(cfg, folder)
    prepare = builder.prepare if isinstance(builder, CnnjaxImageFolder) else None
    splits = {split: store.load(builder, split, prepare=prepare,
                                image_shape=tuple(builder.info.features["image"].shape),
                                fix=f"; delete {builder.data_path} to prepare it again")
              for split in _SPLITS}
    skipped = tuple(_stored_metadata(_prepared_path(cfg, folder)).get("skipped") or ())
    return stream.Stored(_measured_spec(cfg, folder, splits["train"][0]), splits, skipped)


def _measured_spec(cfg: DataConfig, folder: _Folder, train: np.ndarray) -> datasets.DatasetSpec:
    """The spec, with per-channel mean and std of the train split (before the validation set is
    carved out of it, so they do not depend on the seed); measured once per process."""
    key = (cfg.dataset, os.fspath(store.data_root(cfg.data_dir)),
           store.target_size(cfg.image_size), cfg.test_fraction, folder.fingerprint)
    if key not in _specs:
        mean, std = store.channel_stats(train)
        _specs[key] = _spec(cfg, folder, tuple(train.shape[1:]), mean, std)
    return _specs[key]


def _spec(cfg: DataConfig, folder: _Folder, shape, mean, std) -> datasets.DatasetSpec:
    return datasets.DatasetSpec(name=cfg.dataset, num_classes=len(folder.classes),
                                image_shape=tuple(shape), mean=tuple(mean), std=tuple(std),
                                splits=_SPLITS, needs_download=False, class_names=folder.classes)


# ----------------------------------------------------------------------------- streaming

_INDEX = "stream.json"


def _read_index(path: pathlib.Path, folder: _Folder) -> dict:
    """The streaming index of `folder` at `path`, if it was written for the folder as it is."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) and index.get("fingerprint") == folder.fingerprint \
        else {}


def _headers(cfg: DataConfig, folder: _Folder) -> dict:
    """The image shape and the files that are no image, from the headers (`_prepared_shape`),
    cached in the folder's index: one header pass serves `auto`'s size, preparing and streaming."""
    path = _config_dir(cfg, folder) / _INDEX
    index = _read_index(path, folder)
    if "shape" not in index:
        shape, not_images = _prepared_shape(folder, store.target_size(cfg.image_size),
                                            cfg.on_bad_image == "skip")
        index = {"fingerprint": folder.fingerprint, "shape": list(shape),
                 "not_images": _relative(folder, not_images)}
        store.write_small(path, json.dumps(index).encode())
    _check_skipped(cfg, folder, index["not_images"])
    return index


def decoded_bytes(cfg: DataConfig) -> int:
    """Bytes of the folder's pixels decoded at the prepared size, every split (without decoding:
    the prepared copy's shape, else the files' headers)."""
    return _decoded_bytes(cfg, _scan(cfg))


def _decoded_bytes(cfg: DataConfig, folder: _Folder) -> int:
    prepared = _prepared_path(cfg, folder)
    if _stored_metadata(prepared).get("fingerprint") == folder.fingerprint:
        with store.quiet(absl_logging.ERROR):
            info = tfds.builder_from_directory(prepared).info
        n = sum(info.splits[s].num_examples for s in _SPLITS)
        return n * math.prod(info.features["image"].shape)
    index = _headers(cfg, folder)
    n = sum(len(f) for f in folder.files.values()) - len(index["not_images"])
    return n * math.prod(index["shape"])


def _streamed(cfg: DataConfig, folder: _Folder) -> stream.Stored:
    """The folder for streaming: each split's files read by index (decoded and resized where they
    are read, nothing prepared). Its spec's statistics, and with `data.on_bad_image=skip` the files
    that fail to decode, come from one pass over every file through grain at first use (cached in
    the data dir's index beside where a prepared copy would go): the spec an in-memory run gets."""
    index = _headers(cfg, folder)
    path = _config_dir(cfg, folder) / _INDEX
    shape = tuple(index["shape"])
    skip_bad = cfg.on_bad_image == "skip"
    not_images = {folder.root / f for f in index["not_images"]}
    files = {s: [(f, int(y)) for f, y in zip(folder.files[s], folder.labels[s])
                 if f not in not_images] for s in _SPLITS}
    if "mean" not in index:
        every = [f for s in _SPLITS for f, _ in files[s]]
        counted = np.array([s == "train" for s in _SPLITS for _ in files[s]])
        stream.notice(f"{cfg.dataset}: reading its {len(every)} images once for their statistics "
                      f"(cached in {path})")
        hist, bad = stream.scan(FolderReader(every, shape[-1], shape[:2]),
                                np.arange(len(every)), counted, shape[-1], workers=cfg.workers,
                                timeout_s=cfg.read_timeout_s, skip_bad=skip_bad,
                                what=f"the images of {folder.root}")
        mean, std = store.stats_from_histogram(hist)
        index = {**index, "mean": mean, "std": std,
                 "undecodable": _relative(folder, [every[i] for i in bad])}
        store.write_small(path, json.dumps(index).encode())
    _check_skipped(cfg, folder, index["undecodable"])
    bad = {folder.root / f for f in index["undecodable"]}
    splits = {}
    for s in _SPLITS:
        kept = [(f, y) for f, y in files[s] if f not in bad]
        reader = FolderReader([f for f, _ in kept], shape[-1], shape[:2])
        splits[s] = stream.whole(reader, np.array([y for _, y in kept], np.int32))
    skipped = tuple(sorted(index["not_images"] + index["undecodable"]))
    return stream.Stored(_spec(cfg, folder, shape, index["mean"], index["std"]), splits, skipped)
