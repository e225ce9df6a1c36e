"""A set of finished runs to compare or combine: run directories, a directory holding them, or a
study (`<study>/study.json` and its trial run directories under `<study>/trials/<number>/`).

What `cnnjax compare`, `cnnjax ensemble`, `load_ensemble` and the HParams callback share: which
directories are runs, how runs rank by their monitor, and a config as flat `section.field` keys.
Reads JSON only; loading a run's parameters is `load_run`'s.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterable, Sequence

from cnnjax import notices
from cnnjax.config import Config
from cnnjax.report.logs import read_jsonl
from cnnjax.training import rundir

STUDY_FILE = "study.json"
MINIMIZED = {"val_loss": True, "val_accuracy": False}


def flat_config(cfg: Config | dict) -> dict[str, Any]:
    """Every config value under its `section.field` key; a dict field's entries under
    `section.field.key` (`model.kwargs.dropout`), nested dicts likewise. Values as stored: numbers,
    strings, bools, None, lists."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else cfg
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):  # an empty one (no model.kwargs) leaves no key
            for key in value:
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", tree)
    return out


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A finished run as its JSON files describe it (no parameters loaded)."""

    run_dir: pathlib.Path
    config: Config
    summary: dict[str, Any]
    name: str  # how tables and legends call it: its path below the common parent, or a trial's

    @property
    def flat(self) -> dict[str, Any]:
        return flat_config(self.config)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's lines (step windows and epochs); none when the file is missing."""
        path = self.run_dir / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    def score(self, monitor: str) -> float:
        """The run's validation figure for `monitor` (on its own validation split)."""
        return float(self.summary["val"]["loss" if monitor == "val_loss" else "accuracy"])


@dataclasses.dataclass(frozen=True)
class Trial:
    """A trial of study.json."""

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    run_dir: pathlib.Path | None
    wall_time_s: float | None
    epochs: int | None


@dataclasses.dataclass(frozen=True)
class Study:
    """study.json: its name, direction, monitor, search space and trials."""

    path: pathlib.Path  # the study directory
    name: str
    direction: str  # 'minimize' | 'maximize'
    monitor: str
    space: dict[str, dict[str, Any]]
    trials: tuple[Trial, ...]

    def ranked(self) -> list[Trial]:
        """The complete trials with a value, best first (ties: the earlier trial)."""
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        sign = 1.0 if self.direction == "minimize" else -1.0
        return sorted(done, key=lambda t: (sign * t.value, t.number))


def is_study(path: pathlib.Path | str) -> bool:
    return (pathlib.Path(path) / STUDY_FILE).is_file()


def is_run(path: pathlib.Path | str) -> bool:
    """A finished run directory: config.json and summary.json (written last)."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and (path / "summary.json").is_file()


def read_study(path: pathlib.Path | str) -> Study:
    path = pathlib.Path(path)
    file = path / STUDY_FILE
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found: {path} is not a study directory (cnnjax "
                                f"search writes study.json there).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}).") from None
    try:
        direction = d["direction"]
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction {direction!r} is neither 'minimize' nor 'maximize'")
        trials = tuple(Trial(number=int(t["number"]), state=str(t["state"]),
                             params=dict(t.get("params") or {}),
                             value=None if t.get("value") is None else float(t["value"]),
                             run_dir=path / t["run_dir"] if t.get("run_dir") else None,
                             wall_time_s=t.get("wall_time_s"), epochs=t.get("epochs"))
                       for t in d["trials"])
        return Study(path=path, name=str(d.get("name") or path.name), direction=direction,
                     monitor=str(d.get("monitor") or "val_loss"), space=dict(d.get("space") or {}),
                     trials=trials)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file} does not follow the study layout ({type(err).__name__}: "
                         f"{err}); it needs direction and trials with number, state, params, "
                         f"value and run_dir.") from None


def read_run(run_dir: pathlib.Path, name: str | None = None) -> RunRecord:
    run_dir = pathlib.Path(run_dir)
    if not is_run(run_dir):
        if looks_like_run(run_dir):
            raise FileNotFoundError(unfinished(run_dir))
        raise FileNotFoundError(f"{run_dir} is not a finished cnnjax run (it needs config.json "
                                f"and summary.json; an unfinished run has no summary.json yet).")
    return RunRecord(run_dir=run_dir, config=rundir.read_config(run_dir),
                     summary=rundir.read_summary(run_dir), name=name or run_dir.name)


def looks_like_run(path: pathlib.Path) -> bool:
    """A run directory, finished or not: what `cnnjax train` writes first."""
    return (path / "config.json").is_file() or (path / "ckpt").is_dir()


def unfinished(run_dir: pathlib.Path) -> str:
    return (f"{run_dir} is an unfinished run (no summary.json yet: stopped or killed before its "
            f"end); finish it with cnnjax train --resume {run_dir}, or leave it out.")


def expand(paths: Iterable[pathlib.Path | str], skipped: list[str] | None = None
           ) -> list[pathlib.Path]:
    """Run directories from `paths`: each a run directory, or a directory whose subdirectories
    (one or two levels down, in sorted order) hold finished runs. Duplicates are dropped. A run
    found below a directory that is unfinished, or whose config.json or summary.json cannot be
    read, is left out with its reason appended to `skipped`; a run named itself is refused."""
    skipped = [] if skipped is None else skipped
    found: list[pathlib.Path] = []
    for path in map(pathlib.Path, paths):
        if is_run(path):
            found.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory.")
        if looks_like_run(path):
            raise FileNotFoundError(unfinished(path))
        inner = sorted(p for p in path.iterdir() if p.is_dir())
        candidates = [*inner, *(q for p in inner if not is_run(p)
                                for q in sorted(p.iterdir()) if q.is_dir())]
        runs = []
        for p in candidates:
            if is_run(p):
                runs.append(p)
            elif looks_like_run(p):
                skipped.append(unfinished(p))
        if not runs:
            raise FileNotFoundError(f"{path} holds no finished run (a directory with config.json "
                                    f"and summary.json), neither itself nor below it"
                                    + (f"; {'; '.join(skipped)}" if skipped else "."))
        found += sorted(runs)
    return list(dict.fromkeys(p.resolve() for p in found))


def _names(run_dirs: Sequence[pathlib.Path]) -> list[str]:
    """Each run's path below the runs' common parent (its own name when that is unique)."""
    if len(run_dirs) == 1:
        return [run_dirs[0].name]
    parts = [p.parts for p in run_dirs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def monitor_of(records: Sequence[RunRecord]) -> str:
    """The monitor runs are ranked by: theirs when they agree, else the validation loss."""
    monitors = {r.summary.get("monitor", r.config.train.monitor) for r in records}
    return monitors.pop() if len(monitors) == 1 else "val_loss"


def rank(records: Sequence[RunRecord], monitor: str | None = None) -> list[RunRecord]:
    """Best first by `monitor` (default `monitor_of`), each run on its own validation split;
    ties keep the given order."""
    monitor = monitor or monitor_of(records)
    sign = 1.0 if MINIMIZED[monitor] else -1.0
    return sorted(records, key=lambda r: sign * r.score(monitor))


@dataclasses.dataclass(frozen=True)
class RunSet:
    """Finished runs ranked best first, and the study they came from, if any."""

    records: tuple[RunRecord, ...]
    monitor: str
    study: Study | None = None
    skipped: tuple[str, ...] = ()  # trials with no finished run directory, and why


def collect(sources: Sequence[pathlib.Path | str] | pathlib.Path | str) -> RunSet:
    """The runs of `sources`: one study directory, or run directories and directories holding
    them (`expand`). A study's complete trials rank by the study's value and direction, other
    runs by their monitor on validation (`rank`)."""
    if isinstance(sources, (str, pathlib.Path)):
        sources = [sources]
    sources = [pathlib.Path(s) for s in sources]
    if not sources:
        raise ValueError("give at least one run directory, a directory of runs, or a study.")
    studies = [s for s in sources if is_study(s)]
    if studies and len(sources) > 1:
        raise ValueError(f"{studies[0]} is a study: give it alone, or give run directories.")
    if studies:
        study = read_study(studies[0])
        records, skipped = [], []
        for t in study.ranked():
            if t.run_dir is None or not is_run(t.run_dir):
                skipped.append(f"trial {t.number}: no finished run at {t.run_dir}")
                continue
            records.append(read_run(t.run_dir, name=f"trial {t.number}"))
        if not records:
            raise ValueError(f"study {study.path} has no complete trial with a finished run "
                             f"directory yet.")
        return RunSet(tuple(records), study.monitor, study, tuple(skipped))
    skipped: list[str] = []
    run_dirs = expand(sources, skipped)
    named = {s.resolve() for s in sources}
    records = []
    for p, n in zip(run_dirs, _names(run_dirs)):
        try:
            records.append(read_run(p, n))
        except ValueError as err:  # a damaged config.json or summary.json
            if p in named:
                raise
            skipped.append(str(err))
    if not records:
        raise ValueError("no run could be read: " + "; ".join(skipped))
    for reason in skipped:
        notices.warn(f"skipped: {reason}")
    monitor = monitor_of(records)
    return RunSet(tuple(rank(records, monitor)), monitor, skipped=tuple(skipped))


# Keys that say how a run was displayed or where its files were, not what it computed.
NOT_SETTINGS = rundir.DISPLAY_ONLY | {"data.data_dir", "data.manual_dir"}


UNSET = "(default)"  # a dict entry (model.kwargs.*) a run does not set: the model's default


def _shown(flat: dict[str, Any], key: str) -> str:
    return json.dumps(flat[key], sort_keys=True) if key in flat else UNSET


def differing_keys(records: Sequence[RunRecord]) -> list[str]:
    """The flat config keys whose values are not the same in every run (an entry some runs do
    not set counts as differing), in config order."""
    flats = [r.flat for r in records]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if k not in NOT_SETTINGS and len({_shown(f, k) for f in flats}) > 1]


def config_diff(best: RunRecord, other: RunRecord) -> list[tuple[str, Any, Any]]:
    """(key, best's value, other's value) for every setting in which `other` differs from
    `best`; an entry one of them does not set shows as UNSET."""
    a, b = best.flat, other.flat
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in dict.fromkeys([*a, *b])
            if k not in NOT_SETTINGS and _shown(a, k) != _shown(b, k)]
