"""Datasets of the user's own: a registered name or an import path, checked once, described by a spec.

`data.dataset` names a built-in (cnnjax/data/datasets.py), a name given to `register_dataset`, or an
import path `package.module:function`. A source is a function of no arguments, or its result
directly, a dict:

    {"train": (images, labels), "test": (images, labels),
     "mean": ..., "std": ...,      # optional: per-channel constants (or one), in [0, 1] units
     "class_names": [...]}         # optional: one name per class

Images are uint8 pixels, or floats taken as intensities in [0, 1], shaped (N, H, W) or
(N, H, W, C); labels are integers 0..K-1. Image shape, channels and K = 1 + the largest label come
from the data. Without "mean"/"std" they are computed per channel on the whole "train" split,
before the validation set is carved out of it, so they do not depend on the seed.

On the host, pixels keep the pipeline's 0..255 units: uint8 images stay uint8, float images become
float32 multiplied by 255, so that `input_pipeline.normalize`'s /255 serves both (a float image
comes back to within one float32 rounding of its value).

A function is called once per process and name (its checked arrays are cached, read-only), so a
sweep over seeds sees the same data in every seed. A run is reloaded without its data from its
spec, saved with `spec_to_dict` and read with `spec_from_dict`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import Any, Callable, Mapping

import numpy as np

from cnnjax import imports
from cnnjax.config import DataConfig
from cnnjax.data import datasets, store, stream

SPLITS = ("train", "test")
_OPTIONAL = ("mean", "std", "class_names")

_REGISTRY = imports.Registry("dataset", "data.dataset")
_cache: dict[str, tuple[Any, "Source"]] = {}  # name -> (the registered/imported object, its data)


@dataclasses.dataclass(frozen=True)
class Source:
    """A checked dataset in host units: images uint8 or float32 0..255 (N, H, W, C), labels int32."""

    spec: datasets.DatasetSpec
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def register_dataset(name: str, source: Callable[[], Mapping] | Mapping | None = None):
    """Registers a dataset under `name`: `register_dataset("digits", arrays)`, or as a decorator,
    `@register_dataset("digits")` on a function of no arguments returning such a dict.

    A dict is checked now, so a mistake is reported where it was made; a function when it is
    first loaded. Registering a name again replaces it.
    """
    if name in datasets.DATASETS:
        raise ValueError(f"dataset name {name!r} is a built-in; register yours under another name.")
    put = _REGISTRY.register(name)  # checks the name now, also when used as a decorator

    def register(obj):
        if isinstance(obj, Mapping):
            _check(name, obj)
        elif not callable(obj):
            raise ValueError(f"register_dataset({name!r}, ...) takes a function returning "
                             f"{{'train': (images, labels), 'test': (images, labels)}} or that "
                             f"dict itself, got {type(obj).__name__}.")
        _cache.pop(name, None)
        return put(obj)

    return register if source is None else register(source)


def registered() -> tuple[str, ...]:
    return _REGISTRY.names()


def read(cfg: DataConfig) -> stream.Stored:
    """The arrays `cfg` names as a run reads them: already in memory, never streamed."""
    if cfg.stream == "on":
        raise ValueError(f"data.stream=on: dataset {cfg.dataset!r} is arrays of your own, "
                         f"already in memory; streaming reads built-in datasets, "
                         f"imagefolder:PATH and tfds:NAME. Remove the setting.")
    source = load(cfg.dataset)
    return stream.Stored(source.spec, {"train": source.train, "test": source.test})


def load(name: str) -> Source:
    """The checked data of a registered or import-path dataset (not a built-in)."""
    # built-ins and the prefixed kinds only for the error's list
    obj = _REGISTRY.lookup(name, also_known=(*datasets.DATASETS, "imagefolder:PATH", "tfds:NAME"))
    if name in _cache and _cache[name][0] is obj:
        return _cache[name][1]
    raw = _call(name, obj) if callable(obj) and not isinstance(obj, Mapping) else obj
    if not isinstance(raw, Mapping):
        raise ValueError(f"dataset {name!r} must be (or return) a dict {{'train': (images, labels), "
                         f"'test': (images, labels)}}, got {type(raw).__name__}.")
    source = _check(name, raw)
    _cache[name] = (obj, source)
    return source


def _call(name: str, fn: Callable) -> Any:
    try:
        inspect.signature(fn).bind()
    except TypeError as err:
        raise ValueError(f"dataset {name!r} is called with no arguments, but {err}; give it "
                         f"defaults or wrap it (functools.partial).") from None
    except ValueError:  # a builtin without a signature: let the call say
        pass
    try:
        return fn()
    except Exception as err:  # the user's function: named with its own line
        raise ValueError(f"dataset {name!r} raised {imports.where(err)}"
                         f"{imports.first_line(err)}") from None


def host_pixels(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 stays; floats in [0, 1] -> float32 in 0..255 units (what `normalize` divides by 255)."""
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{where}: images must be uint8 pixels or floats in [0, 1], got dtype "
                         f"{images.dtype}; convert with .astype(np.uint8) or divide by 255.")
    if images.size:
        if not np.isfinite(images).all():
            raise ValueError(f"{where}: float images hold NaN or infinite values; replace them.")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float images must be intensities in [0, 1], found "
                             f"[{lo:g}, {hi:g}]; divide by 255 (or rescale), or pass uint8 pixels.")
    return images.astype(np.float32) * np.float32(255.0)


def _check(name: str, raw: Mapping) -> Source:
    what = f"dataset {name!r}"
    unknown = sorted(set(raw) - set(SPLITS) - set(_OPTIONAL), key=str)
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; a dataset dict "
                         f"holds 'train', 'test' and optionally {', '.join(map(repr, _OPTIONAL))}.")
    splits = {s: _check_split(what, s, raw) for s in SPLITS}
    shapes = {s: images.shape[1:] for s, (images, _) in splits.items()}
    if shapes["train"] != shapes["test"]:
        raise ValueError(f"{what}: 'train' images are shaped {shapes['train']} (H, W, C) but "
                         f"'test' images {shapes['test']}; both splits need the same image shape.")
    num_classes = 1 + max(int(labels.max()) for _, labels in splits.values())
    train_images = splits["train"][0]
    channels = train_images.shape[-1]
    computed = None
    if "mean" not in raw or "std" not in raw:
        computed = store.channel_stats(train_images)
    mean = _constants(what, "mean", raw["mean"], channels) if "mean" in raw else computed[0]
    std = _constants(what, "std", raw["std"], channels) if "std" in raw else computed[1]
    if not all(s > 0 for s in std):
        raise ValueError(f"{what}: 'std' must be positive for every channel, got {std}; a "
                         f"channel constant over split 'train' has std 0: give 'std' explicitly.")
    class_names = ()
    if "class_names" in raw:
        names = raw["class_names"]
        class_names = (names,) if isinstance(names, str) else tuple(names)
        if len(class_names) != num_classes or not all(isinstance(c, str) for c in class_names):
            raise ValueError(f"{what}: 'class_names' must be {num_classes} strings, one per "
                             f"class 0..{num_classes - 1} (the largest label + 1), got "
                             f"{len(class_names)} items.")
    spec = datasets.DatasetSpec(name, num_classes, tuple(int(d) for d in shapes["train"]), mean,
                                std, SPLITS, needs_download=False, class_names=class_names)
    return Source(spec=spec, **splits)


def _check_split(what: str, split: str, raw: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """One split's (N, H, W, C) images and int32 labels, or a ValueError naming what is wrong."""
    where = f"{what}, split {split!r}"
    if split not in raw:
        raise ValueError(f"{what}: no {split!r} split; the dict needs 'train' and 'test', each "
                         f"an (images, labels) pair.")
    pair = raw[split]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{where}: expected an (images, labels) pair, got "
                         f"{type(pair).__name__}.")
    try:
        images, labels = np.asarray(pair[0]), np.asarray(pair[1])
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"{where}: images and labels must be arrays ({err}).") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or 0 in images.shape[1:]:
        raise ValueError(f"{where}: images must be shaped (N, H, W) or (N, H, W, C), got "
                         f"{images.shape}.")
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be shaped (N,), got {labels.shape}.")
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels; give one "
                         f"label per image.")
    if not len(labels):
        raise ValueError(f"{where}: the split is empty; give it at least one example.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers 0..K-1, got dtype {labels.dtype}; "
                         f"convert class values to indices (e.g. np.unique(y, return_inverse=True)).")
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{where}: labels must be integers 0..K-1, found {labels.min()}..."
                         f"{labels.max()}; renumber the classes from 0.")
    return _read_only(host_pixels(images, where)), _read_only(labels.astype(np.int32))


def _constants(what: str, key: str, value, channels: int) -> tuple[float, ...]:
    values = (value,) if isinstance(value, numbers.Real) else tuple(np.ravel(value).tolist())
    if len(values) not in (1, channels):
        raise ValueError(f"{what}: {key!r} must be one number or one per channel ({channels}), "
                         f"got {len(values)}.")
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
        raise ValueError(f"{what}: {key!r} must be finite numbers in [0, 1] units, got {value!r}.")
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


# ----------------------------------------------------------------------------- saved specs

_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(datasets.DatasetSpec))


def spec_to_dict(spec: datasets.DatasetSpec) -> dict[str, Any]:
    """The spec as plain JSON values (tuples as lists), for a run directory's data_spec.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def spec_from_dict(d: Mapping[str, Any]) -> datasets.DatasetSpec:
    """The inverse of `spec_to_dict`: a run's spec without its data (for reloading a run)."""
    required = {f.name for f in dataclasses.fields(datasets.DatasetSpec)
                if f.default is dataclasses.MISSING}
    missing, unknown = sorted(required - set(d)), sorted(set(d) - set(_SPEC_FIELDS))
    if missing or unknown:
        raise ValueError(f"a saved dataset spec needs the keys {', '.join(_SPEC_FIELDS)}; missing "
                         f"{missing}, unknown {unknown}.")
    const = lambda v: float(v) if isinstance(v, numbers.Real) else tuple(map(float, v))
    return datasets.DatasetSpec(
        name=str(d["name"]), num_classes=int(d["num_classes"]),
        image_shape=tuple(int(n) for n in d["image_shape"]), mean=const(d["mean"]),
        std=const(d["std"]), splits=tuple(d["splits"]), needs_download=bool(d["needs_download"]),
        class_names=tuple(d.get("class_names", ())))
