"""A search space: config keys mapped to Optuna's distributions, or a function of a trial.

A space file (TOML or JSON) maps each config key to Optuna's own terms:

    {"optim.learning_rate": {"low": 1e-4, "high": 1e-2, "log": true},
     "augment.rotate": {"low": 0, "high": 15},                 # ints: an int range
     "train.batch_size": {"choices": [32, 64, 128]},
     "model.kwargs.features": {"choices": [[16, 32], [32, 64]]}}

Both bounds ints make an int range (`step` too); `choices` a categorical one (lists are allowed:
Optuna stores them as JSON text). A conditional space (momentum only when `optim.name=sgd`) is a
Python function `(trial) -> {key: value}` that calls `trial.suggest_*` itself, registered with
`register_space` or named by an import path `package.module:function`.

Everything a file can get wrong is found here, before any trial starts: a key that does not exist
(with the closest one), an empty or reversed range, a log range with a bound <= 0, a value of the
wrong type for its field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import tomllib
from typing import Any, Callable

import optuna

from cnnjax import imports
from cnnjax.config import Config

SPACES = imports.Registry("search space", "--space")


def register_space(name: str, fn: Callable | None = None):
    """Registers a conditional space `fn(trial) -> {config key: value}` under `name` (usable as
    `cnnjax search --space NAME`); as a decorator when `fn` is omitted."""
    return SPACES.register(name, fn)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _encoded(value: Any) -> Any:
    """A choice as Optuna stores it: lists and dicts as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def decoded(value: Any, choices: tuple | None) -> Any:
    """A trial's stored value back as the config value it stands for."""
    if choices is not None and isinstance(value, str) and value not in choices:
        return json.loads(value)
    return value


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""

    key: str
    distribution: optuna.distributions.BaseDistribution
    choices: tuple | None = None  # a categorical's values as the config takes them

    def suggest(self, trial: optuna.Trial) -> Any:
        d = self.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return decoded(trial.suggest_categorical(self.key, d.choices), self.choices)
        if isinstance(d, optuna.distributions.IntDistribution):
            return trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)


@dataclasses.dataclass(frozen=True)
class Space:
    """What a study searches: parameters from a file, or a function of the trial.

    `described` is what the study stores and compares on a rerun (a file's mapping, or the
    function's import path or name)."""

    params: tuple[Param, ...] = ()
    fn: Callable | None = None
    described: Any = None
    name: str = "space"  # names the default study directory

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's config overrides: {key: value}."""
        if self.fn is None:
            return {p.key: p.suggest(trial) for p in self.params}
        out = imports.call(self.fn, f"search space {self.described!r}", trial)
        if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
            raise ValueError(f"search space {self.described!r} returned {type(out).__name__}; it "
                             f"must return a dict of config keys to values, e.g. "
                             f"{{'optim.learning_rate': 0.01}}.")
        return out

    def grid(self) -> dict[str, list]:
        """GridSampler's search space: every parameter categorical or a stepped range."""
        if self.fn is not None:
            raise ValueError("--sampler grid needs a space file (a function's parameters are not "
                             "known before it runs).")
        grid = {}
        for p in self.params:
            d = p.distribution
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                grid[p.key] = list(d.choices)
            elif isinstance(d, optuna.distributions.IntDistribution) and not d.log:
                grid[p.key] = list(range(d.low, d.high + 1, d.step))
            elif isinstance(d, optuna.distributions.FloatDistribution) and d.step and not d.log:
                n = int(round((d.high - d.low) / d.step))
                grid[p.key] = [d.low + i * d.step for i in range(n + 1)]
            else:
                raise ValueError(f"--sampler grid: {p.key} is a continuous or log range; give it "
                                 f"'choices' or a 'step' (and no 'log').")
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())


def _param(key: str, spec: Any, base: Config) -> Param:
    """One entry of a space file, checked against the config."""
    where = f"search space {key!r}"
    try:
        current = base.get(key)
    except KeyError:
        current = None  # a dict entry (model.kwargs.x) not set yet: the value decides its type
    except ValueError as err:  # an unknown key, with the closest one
        raise ValueError(f"search space: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: give {{'low': ..., 'high': ...}} or {{'choices': [...]}}, "
                         f"got {spec!r}.")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        choices = spec["choices"]
        if extra:
            raise ValueError(f"{where}: 'choices' takes no {sorted(extra)}.")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: 'choices' must be a non-empty list, got {choices!r}.")
        for value in choices:
            _check_value(base, key, value, where)
        encoded = tuple(_encoded(v) for v in choices)
        if len(set(map(json.dumps, choices))) != len(choices):
            raise ValueError(f"{where}: 'choices' repeats a value: {choices}.")
        return Param(key, optuna.distributions.CategoricalDistribution(encoded), tuple(choices))
    extra = set(spec) - {"low", "high", "log", "step"}
    if extra or not {"low", "high"} <= set(spec):
        raise ValueError(f"{where}: a range is {{'low': L, 'high': H}} with optional 'log' and "
                         f"'step'; got keys {sorted(spec)}.")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)):
        raise ValueError(f"{where}: bounds must be numbers, got low={low!r}, high={high!r}.")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: 'log' must be true or false, got {log!r}.")
    if low > high:
        raise ValueError(f"{where}: the range is reversed (low={low} > high={high}); swap them.")
    if low == high:
        raise ValueError(f"{where}: the range is empty (low = high = {low}); fix the value with "
                         f"--set {key}={low} instead.")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs bounds > 0, got low={low}.")
    if step is not None and (not _is_number(step) or step <= 0):
        raise ValueError(f"{where}: 'step' must be a positive number, got {step!r}.")
    if step is not None and log:
        raise ValueError(f"{where}: 'step' and 'log' do not go together (Optuna samples a log "
                         f"range continuously); drop one.")
    as_int = _is_int(low) and _is_int(high) and (step is None or _is_int(step))
    if not as_int and isinstance(current, int) and not isinstance(current, bool):
        raise ValueError(f"{where}: {key} is an integer field; give integer bounds, got "
                         f"low={low!r}, high={high!r}.")
    for value in (low, high):
        _check_value(base, key, value, where)
    if as_int:
        return Param(key, optuna.distributions.IntDistribution(low, high, log=log, step=step or 1))
    return Param(key, optuna.distributions.FloatDistribution(float(low), float(high), log=log,
                                                             step=step))


def _check_value(base: Config, key: str, value: Any, where: str) -> None:
    """The config takes `value` at `key` (its type, the field's own checks)."""
    try:
        base.set(key, value)
    except ValueError as err:
        raise ValueError(f"{where}: the value {value!r} does not fit: {err}") from None


def read_space_file(path: pathlib.Path) -> dict[str, Any]:
    """A TOML or JSON file's mapping (TOML: keys with dots are quoted, `"optim.learning_rate" =
    {low = 1e-4, high = 1e-2, log = true}`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--space {path}: no such file; give a TOML or JSON space file, "
                                f"a registered space or package.module:function.") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"--space {path} is not valid {kind} ({err}).") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--space {path} must map config keys to ranges or choices; it is empty "
                         f"or not a mapping.")
    return data


def from_mapping(mapping: dict[str, Any], base: Config, name: str = "space") -> Space:
    """A space from a file's mapping, every entry checked against `base`."""
    params = tuple(_param(key, spec, base) for key, spec in mapping.items())
    return Space(params=params, described=json.loads(json.dumps(mapping)), name=name)


def load_space(source: str | pathlib.Path | dict | Callable, base: Config) -> Space:
    """A space from a file path, a mapping, a function, a registered name or an import path."""
    if isinstance(source, dict):
        return from_mapping(source, base)
    if callable(source):
        name = getattr(source, "__name__", "space")
        return Space(fn=source, described=f"{source.__module__}:{source.__qualname__}", name=name)
    text = str(source)
    if text in SPACES or imports.is_import_path(text):
        fn = SPACES.lookup(text)
        if isinstance(fn, dict):
            return from_mapping(fn, base, text)
        if not callable(fn):
            raise ValueError(f"--space {text!r} names a {type(fn).__name__}, not a function "
                             f"(trial) -> {{config key: value}}.")
        return Space(fn=fn, described=text, name=text.rpartition(":")[2] or text)
    path = pathlib.Path(text)
    if path.suffix.lower() not in (".toml", ".json") and not path.exists():
        raise ValueError(f"--space {text!r} is neither a .toml/.json file, a registered space "
                         f"({', '.join(SPACES.names()) or 'none registered'}) nor an import path "
                         f"package.module:function.")
    return from_mapping(read_space_file(path), base, path.stem)


def space_differences(stored: Any, wanted: Any) -> list[str]:
    """Lines saying how a study's stored space differs from the one given now."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        lines = []
        for key in dict.fromkeys([*stored, *wanted]):
            if key not in wanted:
                lines.append(f"{key}: {json.dumps(stored[key])} -> (not searched)")
            elif key not in stored:
                lines.append(f"{key}: (not searched) -> {json.dumps(wanted[key])}")
            elif stored[key] != wanted[key]:
                lines.append(f"{key}: {json.dumps(stored[key])} -> {json.dumps(wanted[key])}")
        return lines
    return [] if stored == wanted else [f"{json.dumps(stored)} -> {json.dumps(wanted)}"]
