"""A sweep's plan: the base config, the grid of values its members differ in, seeds and lowering.

`cnnjax sweep --grid 'optim.learning_rate=[1e-3,3e-3]' --grid 'model.kwargs.dropout=[0,0.5]'
--seeds 2` trains every combination of the grid's values with each seed: 2 x 2 x 2 members, each a
run of its own config (`Plan.members`), named by its values and seed
(`learning_rate=0.001,dropout=0.5,seed=1`).

A grid may vary only values that leave the compiled train step's shapes and program alone, so one
program serves every member under the 'vmap' lowering (cnnjax/training/traced.py): the optimizer's
scalars, seed_cnn's dropout rates, label smoothing, the warps' magnitudes, mixup and CutMix alphas;
and values the host applies per member between epochs (the plateau rule, early stopping). Any
other key is refused with why, before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any, Mapping, Sequence

from cnnjax.config import Config
from cnnjax.training import traced

# Values the host applies to each member on its own: in no compiled program.
HOST = ("optim.plateau_factor", "optim.plateau_patience", "optim.plateau_threshold",
        "train.early_stopping_patience")
GRIDDABLE = tuple(traced.TRACEABLE) + HOST

# Why the other keys cannot vary within one sweep, by key or by its section's prefix.
_WHY = {
    "train.seed": "the seeds come from --seeds N (every combination trains with each seed)",
    "train.batch_size": "it changes the shape of every batch",
    "train.epochs": "members train side by side, epoch by epoch, for the same length",
    "train.microbatch": "it changes how a step splits into passes: another program",
    "train.dtype": "it changes the program's compute dtype",
    "train.loss": "it changes the program's loss function",
    "train.monitor": "members are ranked and stopped by one monitored figure",
    "model.name": "it changes the model: its parameters' shapes and its program",
    "model.kwargs": "it changes the model's shapes or program (of a model's arguments, only "
                    "seed_cnn's dropout and conv_dropout may vary)",
    "optim.name": "it changes the optimizer: its state and program",
    "optim.schedule": "it changes the learning-rate schedule's program",
    "optim.amsgrad": "it changes the optimizer's state (AMSGrad's running maximum)",
    "optim.nesterov": "it changes the optimizer's program",
    "optim.clip_norm": "it adds or removes a transform of the optimizer",
    "optim.ema_decay": "it adds or removes the parameters' EMA in the optimizer's state",
    "optim.min_lr": "it is part of the learning-rate schedule",
    "optim.warmup_steps": "it is part of the learning-rate schedule",
    "optim.kwargs": "a user's optimizer may build another program from its arguments",
    "optim.schedule_kwargs": "a user's schedule may build another program from its arguments",
    "augment": "it changes the augmentation pipeline's program (of its fields, only rotate, "
               "translate, scale, mixup and cutmix may vary)",
    "data": "it changes the data: the training split and its steps per epoch",
    "transfer": "a sweep does not take transfer learning",
    "train": "it changes how members are logged, saved or evaluated, not what they learn: set it "
             "once for the whole sweep with --set",
}
LOWERINGS = ("loop", "vmap", "unroll")


def why_not(key: str) -> str:
    """Why `key` cannot vary within one sweep (a key of GRIDDABLE can)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in _WHY:
            return _WHY[".".join(parts[:n])]
    return "it may change the compiled program's shapes"


def parse_grid(items: Sequence[str]) -> dict[str, tuple]:
    """'KEY=[v1,v2,...]' (JSON) or 'KEY=v1,v2,...' strings -> {key: values}, in order."""
    grid: dict[str, tuple] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(f"--grid {item!r} is not of the form KEY=[v1,v2,...], e.g. "
                             f"--grid 'optim.learning_rate=[1e-3,3e-3]'.")
        try:
            values = (json.loads(raw) if raw.startswith("[")
                      else [json.loads(v) for v in raw.split(",")])
        except json.JSONDecodeError as err:
            raise ValueError(f"--grid {item!r}: the values are not a JSON list of numbers "
                             f"({err}).") from None
        if key in grid:
            raise ValueError(f"--grid names {key} twice; give all its values in one list.")
        grid[key] = tuple(values)
    return grid


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: its grid values, seed, config and directory name."""

    name: str
    values: Mapping[str, Any]
    seed: int
    config: Config


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a sweep trains: `config` (train.seed is the first seed), the value sets of its members
    (`points`: every combination of `grid`'s values, or sets given one by one, as a search's batch
    of trials), `seeds` and `lowering`. Built by `make_plan`, which refuses what cannot be swept;
    saved in sweep.json."""

    config: Config
    grid: Mapping[str, tuple]  # {} when the points were given one by one
    points: tuple[Mapping[str, Any], ...]
    seeds: tuple[int, ...]
    lowering: str

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.points[0]) if self.points else ()

    @property
    def traced(self) -> tuple[str, ...]:
        """The keys whose values the 'vmap' program holds as arrays."""
        return tuple(key for key in self.keys if key in traced.TRACEABLE)

    def members(self) -> list[Member]:
        """Each value set (a grid's: its first key's values slowest) with each seed."""
        short, out = _short_names(self.keys), []
        for point in self.points:
            cfg = self.config
            for key, value in point.items():
                cfg = cfg.set(key, value)
            for seed in self.seeds:
                label = ",".join([f"{short[k]}={_shown(v)}" for k, v in point.items()]
                                 + [f"seed={seed}"])
                out.append(Member(re.sub(r"[^A-Za-z0-9_.,=+-]", "_", label), dict(point), seed,
                                  cfg.set("train.seed", seed)))
        return out

    def to_json(self) -> dict[str, Any]:
        """The plan as sweep.json holds it: the grid as [key, values] pairs (their order names
        and orders the members), or else the value sets."""
        return {"config": self.config.to_dict(), "seeds": list(self.seeds),
                "lowering": self.lowering,
                **({"grid": [[k, list(v)] for k, v in self.grid.items()]} if self.grid
                   else {"points": [[[k, v] for k, v in p.items()] for p in self.points]})}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Plan":
        return make_plan(Config.from_dict(d["config"]), d["seeds"], d["lowering"],
                         grid={k: tuple(v) for k, v in d.get("grid", [])},
                         points=[dict(p) for p in d.get("points", [])])


def make_plan(cfg: Config, seeds: Sequence[int], lowering: str,
              grid: Mapping[str, Sequence] | None = None,
              points: Sequence[Mapping[str, Any]] | None = None) -> Plan:
    """The plan of a sweep over every combination of `grid`'s values, or over the value sets
    `points` (each setting the same keys), with each seed; raises ValueError naming the key and
    why, once it is known that a key cannot vary within one sweep, and checks every member's
    config (Config.set's checks)."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"a sweep needs distinct seeds, got {list(seeds)}.")
    if lowering not in LOWERINGS:
        raise ValueError(f"sweep lowering must be one of {LOWERINGS}, got {lowering!r}.")
    if cfg.transfer.active:
        raise ValueError("cnnjax sweep does not support transfer learning (cfg.transfer); train "
                         "each configuration with cnnjax train instead.")
    grid = {key: tuple(values) for key, values in (grid or {}).items()}
    points = tuple(dict(p) for p in (points or ()))
    if grid and points:
        raise ValueError("a sweep takes a grid or a list of value sets, not both.")
    label = "--grid" if grid else "sweep value"
    if points:
        keys = list(points[0])
        if any(list(p) != keys for p in points):
            raise ValueError(f"every value set of a sweep sets the same keys in the same order "
                             f"({keys}); got {[list(p) for p in points]}.")
        if len({json.dumps(p) for p in points}) != len(points):
            raise ValueError("a sweep's value sets repeat one.")
        values_of = {k: tuple(p[k] for p in points) for k in keys}
    else:
        values_of = grid
    for key, values in values_of.items():
        if not values:
            raise ValueError(f"{label} {key} has no values.")
        if key not in GRIDDABLE:
            cfg.set(key, values[0])  # an unknown key is named, with the closest known one
            raise ValueError(f"{label} {key}: cannot vary within one sweep: {why_not(key)}.")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{label} {key}={list(values)}: give numbers.")
        if grid and len(set(values)) != len(values):
            raise ValueError(f"{label} {key}={list(values)} repeats a value.")
        _check_fits(cfg, key, values)
    if grid:
        keys = list(grid)
        points = tuple(dict(zip(keys, combo)) for combo in itertools.product(*grid.values()))
    plan = Plan(cfg, grid, points or ({},), seeds, lowering)
    plan.members()  # every member's config through Config.set's checks
    return plan


def _check_fits(cfg: Config, key: str, values: Sequence) -> None:
    """What a key's values need of the rest of the config to share one program."""
    name = cfg.optim.name
    if key.startswith("model.kwargs.") and cfg.model.name != "seed_cnn":
        raise ValueError(f"--grid {key}: a sweep varies the dropout of seed_cnn only; "
                         f"model.name={cfg.model.name} may build another program for each rate.")
    if key == "optim.momentum":
        if name != "sgd":
            raise ValueError(f"--grid optim.momentum applies to optim.name=sgd, not {name}.")
        if 0 in values and any(v != 0 for v in values):
            raise ValueError(f"--grid optim.momentum={list(values)}: 0 turns momentum off, which "
                             f"drops its buffer from the optimizer's state; sweep values above 0, "
                             f"and momentum 0 in a sweep of its own.")
    if key in ("optim.b1", "optim.b2", "optim.eps") and name not in ("torch_adam", "adam", "adamw"):
        raise ValueError(f"--grid {key} applies to the Adam optimizers, not optim.name={name}.")
    if key == "train.label_smoothing" and cfg.train.loss != "cross_entropy":
        raise ValueError(f"--grid train.label_smoothing applies to train.loss=cross_entropy, not "
                         f"{cfg.train.loss}.")


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part, or by more of its parts where two keys would share a name."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k.split(".")[-n:] == parts[-n:] for k in keys) == 1:
                break
        out[key] = name
    return out


def _shown(value: Any) -> str:
    return json.dumps(value)
