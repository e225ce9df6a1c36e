"""Typed, frozen run configuration: defaults are the seed program's, overrides come as key=value.

A `Config` is saved as `config.json` in every run directory and read back with `Config.from_dict`,
so a run can be reproduced or inspected from its directory alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from typing import Any, Union


STREAM_MODES = ("auto", "on", "off")
BAD_IMAGE_RULES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # a built-in (mnist5k, mnist, fashion_mnist, cifar10, cifar100), imagefolder:PATH,
    # tfds:NAME[/CONFIG][:VERSION], a registered name or package.module:function
    dataset: str = "mnist5k"
    data_dir: str | None = None  # TFDS data dir; None: $CNNJAX_DATA_DIR or ~/.cache/cnnjax/tfds
    manual_dir: str | None = None  # holds the official archives (IDX .gz, CIFAR .tar.gz) offline
    val_fraction: float = 0.2  # seeded split of the train split into train/validation
    classes: tuple[int, ...] = ()  # keep only these labels, renumbered 0..k-1 in this order; () all
    label: str = ""  # which label: cifar100 'fine' or 'coarse', a tfds: dataset's feature; '': default
    image_size: tuple[int, ...] = ()  # (H, W) or (S,): resize image-folder/tfds images; (): as stored
    test_fraction: float = 0.2  # seeded, stratified test split of a dataset that has no 'test' split
    # Streaming (cnnjax/data/stream.py): 'auto' reads a dataset through grain, batch by batch, when
    # its splits' decoded pixels exceed max_memory_gb, else holds it in memory; 'on' always streams
    # a prepared dataset, image folder or tfds: dataset; 'off' never does. Same batches either way.
    stream: str = "auto"
    max_memory_gb: float = 4.0  # an in-memory run peaks near twice its data (split read, copy)
    workers: int = 0  # grain worker processes that read, decode and resize; 0: the main process
    read_timeout_s: float = 300.0  # a batch awaited longer (+2 min as workers start): a hang
    on_bad_image: str = "error"  # an unreadable image file: 'error' names it, 'skip' drops it

    def __post_init__(self):
        if len(self.image_size) not in (0, 1, 2) or not all(s > 0 for s in self.image_size):
            raise ValueError(f"data.image_size={list(self.image_size)} is not valid: give H,W or one "
                             f"size S for S x S (positive pixels), or [] to keep stored sizes.")
        for field in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, field) < 1.0:
                raise ValueError(f"data.{field}={getattr(self, field)} is not valid: use a "
                                 f"fraction in (0, 1).")
        checks = [
            ("stream", self.stream in STREAM_MODES, f"choose one of {', '.join(STREAM_MODES)}"),
            ("max_memory_gb", self.max_memory_gb > 0, "give a positive number of gigabytes"),
            ("workers", self.workers >= 0, "give 0 (read in the main process) or a number of "
                                           "worker processes"),
            ("read_timeout_s", self.read_timeout_s > 0, "give a positive number of seconds"),
            ("on_bad_image", self.on_bad_image in BAD_IMAGE_RULES,
             f"choose one of {', '.join(BAD_IMAGE_RULES)}"),
        ]
        for field, ok, fix in checks:
            if not ok:
                raise ValueError(f"data.{field}={getattr(self, field)!r} is not valid: {fix}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model is a name and its constructor's arguments, cnnjax's own presets included: `seed_cnn`
    (the seed's SeedCNN: features, kernel_size, padding, pool, dense, dropout, batch_norm, ...),
    `resnet18`, `resnet34` (width, stem, grayscale, bn_momentum), a registered name or
    `package.module:Name`; built as `Model(num_classes=..., **kwargs)` (cnnjax/nn/models.py)."""

    name: str = "seed_cnn"
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random affine augmentation on device; a transform left at 0 / false is off."""

    rotate: float = 0.0  # degrees, uniform in [-rotate, rotate] (the seed: 10)
    translate: float = 0.0  # pixels, uniform per axis
    scale: float = 0.0  # zoom uniform in [1 - scale, 1 + scale]
    flip: bool = False  # horizontal, p = 0.5 (in the seed; hurts digits, so off)
    crop: int = 0  # RandomCrop(padding=crop): whole-pixel shifts in [-crop, crop]; CIFAR's recipe: 4
    order: tuple[str, ...] = ("scale", "rotate", "translate", "crop", "flip")  # first acts first
    mixup: float = 0.0  # Beta(a, a) mixing of each example with the batch's previous one; 0: off
    cutmix: float = 0.0  # the same with a pasted box (area 1 - lambda); with mixup, p = 0.5 each
    # Arguments of registered or import-path transforms named in `order`, by name:
    # {"mylab.aug:elastic": {"alpha": 3}} (cnnjax/data/augment.py)
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for field in ("mixup", "cutmix"):
            if getattr(self, field) < 0:
                raise ValueError(f"augment.{field}={getattr(self, field)} is not valid: give the "
                                 f"Beta distribution's alpha (> 0), or 0 for off.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5  # coupled L2 as torch's Adam and SGD do; adamw: decoupled, as AdamW
    amsgrad: bool = True  # torch_adam only (torch's AMSGrad; optax's differs)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    plateau_factor: float = 0.5  # ReduceLROnPlateau on the validation loss, once per epoch
    plateau_patience: int = 3  # in torch's convention
    plateau_threshold: float = 1e-4  # torch's relative threshold
    min_lr: float = 1e-6  # the plateau rule's floor; where cosine and warmup_cosine end
    # a registered optimizer (torch_adam, adam, adamw, sgd: cnnjax/training/optim.py) or
    # package.module:factory, called factory(cfg, learning_rate) -> optax.GradientTransformation
    name: str = "torch_adam"
    # a registered schedule (plateau, constant, cosine, warmup_cosine, onecycle) or an import path;
    # all but plateau and constant are per step, over epochs x steps
    schedule: str = "plateau"
    warmup_steps: int = 0  # warmup_cosine's linear rise from 0; onecycle's rise (0: torch's 30%)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    clip_norm: float | None = None  # global gradient norm limit, as torch.nn.utils.clip_grad_norm_
    ema_decay: float | None = None  # an EMA of the parameters (torch's AveragedModel), e.g. 0.999
    kwargs: dict = dataclasses.field(default_factory=dict)  # a user's optimizer's own arguments
    schedule_kwargs: dict = dataclasses.field(default_factory=dict)  # a user's schedule's

    def __post_init__(self):
        checks = [
            ("warmup_steps", self.warmup_steps >= 0, "use 0 or a positive number of steps"),
            ("momentum", 0.0 <= self.momentum < 1.0, "use a value in [0, 1)"),
            ("nesterov", not self.nesterov or self.momentum > 0,
             "Nesterov needs momentum: set optim.momentum > 0"),
            ("clip_norm", self.clip_norm is None or self.clip_norm > 0,
             "use a positive norm, or null for no clipping"),
            ("ema_decay", self.ema_decay is None or 0.0 <= self.ema_decay < 1.0,
             "use a value in [0, 1), or null for no EMA"),
        ]
        for field, ok, fix in checks:
            if not ok:
                raise ValueError(f"optim.{field}={getattr(self, field)!r} is not valid: {fix}.")


MONITORS = ("val_loss", "val_accuracy")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    eval_batch_size: int = 1000
    microbatch: int | None = None  # images per device in one forward/backward pass of a step; None: steps.grad_passes picks
    early_stopping_patience: int = 7  # epochs without a better validation loss; 0 disables
    log_every: int = 10  # steps between metrics.jsonl lines
    progress: bool = True  # tqdm progress bar
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch, at the first log line N steps on
    keep_checkpoints: int = 3  # the last k checkpoints, plus the best by validation loss
    async_checkpointing: bool = True  # orbax writes in the background while training goes on
    loss: str = "cross_entropy"  # or package.module:fn, (logits, labels) -> per-example loss
    label_smoothing: float = 0.0  # cross_entropy's target smoothing (optax.smooth_labels)
    monitor: str = "val_loss"  # what early stopping, the plateau rule and the best step watch
    dtype: str = "float32"  # 'bfloat16': activations and matmuls in bf16, params and loss in f32

    def __post_init__(self):
        checks = [
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "use a value in [0, 1)"),
            ("monitor", self.monitor in MONITORS, f"choose one of {', '.join(MONITORS)}"),
            ("dtype", self.dtype in DTYPES, f"choose one of {', '.join(DTYPES)}"),
        ]
        for field, ok, fix in checks:
            if not ok:
                raise ValueError(f"train.{field}={getattr(self, field)!r} is not valid: {fix}.")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Starting from trained weights (cnnjax/transfer.py); the defaults train from scratch."""

    backbone: str | None = None  # a cnnjax run dir, or a torchvision state_dict (.pth/.safetensors)
    step: int | None = None  # the backbone run's checkpoint step; None: its best
    head: tuple[str, ...] = ("fc",)  # parameter paths initialized afresh for this run's classes
    freeze: tuple[str, ...] = ()  # path prefixes held fixed, e.g. conv1,bn1,layer1; 'backbone': all but head
    unfreeze: tuple[str, ...] = ()  # of the frozen, prefixes that start training after...
    unfreeze_after_epochs: int = 0  # ...this many epochs
    backbone_lr_scale: float = 1.0  # learning-rate factor for the trained, non-head parameters

    @property
    def groups(self) -> bool:
        """Whether parameter groups train apart (frozen, unfrozen later, or slower)."""
        return (bool(self.freeze) or bool(self.unfreeze) or self.unfreeze_after_epochs != 0
                or self.backbone_lr_scale != 1.0)

    @property
    def active(self) -> bool:
        """Whether the run starts from other weights or treats parameter groups apart; a run
        with neither never reaches the transfer module."""
        return self.backbone is not None or self.groups


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    transfer: TransferConfig = TransferConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """A config from its dict (config.json), written by this or an earlier cnnjax."""
        return _build(cls, migrate(d), "")

    def override(self, assignments: typing.Iterable[str]) -> "Config":
        """Applies 'section.field=value' strings, e.g. 'optim.learning_rate=3e-4'; a dict field
        takes its entries as 'section.field.key=value' ('model.kwargs.dropout=0.5')."""
        cfg = self
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not of the form section.field=value.")
            cfg = cfg.set(key.strip(), raw.strip())
        return cfg

    def get(self, key: str) -> Any:
        """The value at 'section.field' or 'section.field.key...' (a dict entry); KeyError if unset."""
        section_name, field_name, path = _split_key(self, key)
        value = getattr(getattr(self, section_name), field_name)
        for part in path:
            if not isinstance(value, dict) or part not in value:
                raise KeyError(key)
            value = value[part]
        return value

    def set(self, key: str, raw: Any) -> "Config":
        """A copy with `key` set; a string value is parsed to the field's type (JSON first), a
        value for an entry of a dict field ('model.kwargs.features') as JSON, a comma list or text."""
        section_name, field_name, path = _split_key(self, key)
        section = getattr(self, section_name)
        hint = typing.get_type_hints(type(section))[field_name]
        if path:
            value = _set_in(getattr(section, field_name), path,
                            _parse_free(raw) if isinstance(raw, str) else raw)
        else:
            value = _parse(raw, hint, key) if isinstance(raw, str) else _coerce(raw, hint, key)
        try:
            return dataclasses.replace(self, **{section_name: dataclasses.replace(section, **{field_name: value})})
        except ValueError as err:
            raise ValueError(f"{key}={raw!r}: {err}") from None

    def keys(self) -> list[str]:
        """Every 'section.field' key, in declaration order."""
        return [f"{s.name}.{f.name}" for s in dataclasses.fields(self)
                for f in dataclasses.fields(getattr(self, s.name))]


# Where a field of an earlier ModelConfig now lives: model.kwargs (for the model that takes it).
LEGACY_MODEL_FIELDS = {
    "features": (32, 64), "kernel_size": 3, "stride": 1, "padding": 1, "pool": "max",
    "pool_size": 2, "pool_stride": None, "dense": (128,), "dropout": 0.0, "conv_dropout": 0.0,
    "batch_norm": False, "bn_momentum": 0.9, "conv_lowering": "auto", "width": None,
    "stem": "imagenet", "grayscale": "repeat",
}


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json of an earlier cnnjax in today's layout. ModelConfig carried the built-in
    models' fields until models became `name` + `kwargs`: each one set away from its old default
    moves into `model.kwargs` (those defaults are the built-ins' own, so nothing else changes)."""
    model = d.get("model")
    if not isinstance(model, dict) or not set(model) & set(LEGACY_MODEL_FIELDS):
        return d
    model = dict(model)
    kwargs = dict(model.get("kwargs") or {})
    for name, default in LEGACY_MODEL_FIELDS.items():
        if name in model:
            value = model.pop(name)
            same = (list(value) == list(default) if isinstance(value, (list, tuple))
                    and isinstance(default, tuple) else value == default)
            if not same:
                kwargs[name] = value
    model["kwargs"] = kwargs
    return {**d, "model": model}


def _split_key(cfg: Config, key: str) -> tuple[str, str, tuple[str, ...]]:
    """(section, field, path within a dict field) of a key; an unknown key names the closest."""
    section_name, _, rest = key.partition(".")
    field_name, _, tail = rest.partition(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if section_name not in sections or not field_name:
        raise ValueError(f"unknown config key {key!r}{_closest(key, cfg.keys())}; keys look like "
                         f"'train.epochs', sections: {', '.join(sections)}.")
    hints = typing.get_type_hints(type(getattr(cfg, section_name)))
    if field_name not in hints:
        hint = ""
        if section_name == "model" and field_name in LEGACY_MODEL_FIELDS:
            hint = (f" A model's settings are its constructor's arguments: --set "
                    f"model.kwargs.{field_name}=...")
        raise ValueError(f"unknown config key {key!r}{_closest(key, cfg.keys())}; fields of "
                         f"{section_name!r}: {', '.join(hints)}.{hint}")
    path = tuple(tail.split(".")) if tail else ()
    if path and hints[field_name] is not dict:
        raise ValueError(f"config key {key!r}: {section_name}.{field_name} is not a dict field; "
                         f"set it as {section_name}.{field_name}=value.")
    if any(not p for p in path):
        raise ValueError(f"config key {key!r} has an empty part.")
    return section_name, field_name, path


def _closest(key: str, keys: typing.Sequence[str]) -> str:
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _set_in(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of `tree` with `value` at `path` (dicts made on the way)."""
    head, rest = path[0], path[1:]
    out = dict(tree)
    if rest:
        inner = out.get(head, {})
        out[head] = _set_in(inner if isinstance(inner, dict) else {}, rest, value)
    else:
        out[head] = value
    return out


def _parse_free(raw: str) -> Any:
    """A command-line value with no declared type: JSON, else a comma-separated list, else text."""
    text = raw.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return [_json_or_text(v) for v in text.split(",")]
    return text


def _build(cls, d: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(hints)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(prefix + k for k in unknown)}.")
    if not isinstance(d, dict):
        raise ValueError(f"config {prefix.rstrip('.')}: {d!r} is not a section (a JSON object).")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _options(hint) -> tuple:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _coerce(value: Any, hint, key: str) -> Any:
    """Checks a JSON-decoded value against the field type, turning lists into tuples."""
    for option in _options(hint):
        if option is type(None) and value is None:
            return None
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(option) if a is not Ellipsis}
            return tuple(_coerce(v, item, key) for v in value)
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"config {key}: {value!r} is not a finite number; give a finite "
                                 f"value (e.g. {key}=0.001).")
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
        if option is dict and isinstance(value, dict):
            return dict(value)
    raise ValueError(f"config {key}: {value!r} is not a valid {_type_name(hint)}.")


def _parse(raw: str, hint, key: str) -> Any:
    """Parses a command-line string: JSON first (numbers, true/false, null, lists), else a string."""
    text = raw.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _accepts_tuple(hint):
        value = [value]
    if isinstance(value, str) and _accepts_tuple(hint):
        value = [_json_or_text(v) for v in value.split(",")]
    if value is None and type(None) not in _options(hint):
        value = text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str in _options(hint) \
            and int not in _options(hint) and float not in _options(hint):
        value = text
    return _coerce(value, hint, key)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def _accepts_tuple(hint) -> bool:
    return any(typing.get_origin(o) is tuple for o in _options(hint))


def _type_name(hint) -> str:
    return " or ".join(getattr(o, "__name__", str(o)) for o in _options(hint))
