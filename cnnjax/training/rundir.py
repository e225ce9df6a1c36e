"""The run directory: its default name, creating it, locking it, and checking a run can be resumed.

A run directory holds config.json, metrics.jsonl, timing.jsonl, summary.json, ckpt/ and plots;
it is created by the first (primary) process only, which holds an exclusive lock on its `.lock`
file while it writes: a second writer is refused with the holder's pid. The lock is an `flock`, so
the kernel drops it when its holder dies, and a killed run never blocks its own resume.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import fcntl
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, NamedTuple

from cnnjax.config import Config
from cnnjax.data import datasets, input_pipeline, sources
from cnnjax.report import disk
from cnnjax.training import checkpoint, loop_state

DEFAULT_ROOT = pathlib.Path("checkpoints")
LOCK_FILE = ".lock"
DATA_SPEC = "data_spec.json"  # what the run was trained on: `load_run` rebuilds its model from it
_held: dict[pathlib.Path, int] = {}  # run directories this process writes -> their lock's fd


class RunDirInUse(FileExistsError):
    """Another process holds the run directory's lock."""


def default_run_dir(cfg: Config, root: pathlib.Path = DEFAULT_ROOT) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.data.dataset}-{cfg.model.name}"
    # an import path (package.module:Name) becomes package.module.Name: no ':' or '/' in paths
    name = re.sub(r"[^A-Za-z0-9_.-]+", ".", name)
    return root / f"{name}-s{cfg.train.seed}-{stamp}"


def read_config(run_dir: pathlib.Path) -> Config:
    """The run's config.json, with its path named in every way it can fail to read."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a cnnjax run directory "
                                f"(expected config.json written by `cnnjax train`).")
    try:
        return Config.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it from a copy, or train "
                         f"into a new --run-dir.") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err} Restore the file from a copy, or train into a new "
                         f"--run-dir.") from None


def read_summary(run_dir: pathlib.Path) -> dict:
    """The finished run's summary.json; a damaged one is named with the way out."""
    path = pathlib.Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it from a copy, or delete it "
                         f"and resume the run (cnnjax train --resume {run_dir}) to write it "
                         f"again.") from None


def best_step(run_dir: pathlib.Path) -> int | None:
    """The step of the run's best checkpoint: summary.json's once it finished, else the best so
    far that its latest readable checkpoint records (None before any epoch ended). The one rule
    `load_run` and a backbone taken from a run both follow."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "summary.json").exists():
        return int(read_summary(run_dir)["best_step"])
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: {run_dir} has nothing to "
                                    f"load; train it first (cnnjax train).")
        for step in reversed(steps):
            try:
                return loop_state.best_step_of(ckpt.read_loop(step)) or None
            except checkpoint.DamagedCheckpoint:
                continue
        raise FileNotFoundError(f"every checkpoint in {ckpt.directory} ({steps}) is damaged.")
    finally:
        ckpt.close()


# Fields that change how a run is displayed or its data read, not what it computes: a resumed run
# may differ in them (a streamed run resumes in memory, or with another worker count, exactly).
DISPLAY_ONLY = {"train.progress"} | input_pipeline.READING_SETTINGS


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """'section.field: saved -> wanted' for every field that differs, display-only ones aside."""
    diffs = []
    for section, fields in wanted.to_dict().items():
        for name, value in fields.items():
            key, old = f"{section}.{name}", saved.to_dict()[section][name]
            if old != value and key not in DISPLAY_ONLY:
                diffs.append(f"{key}: {old!r} -> {value!r}")
    return diffs


def lock_run_dir(run_dir: pathlib.Path) -> None:
    """Takes the run directory's lock for this process (again: a no-op) or raises RunDirInUse."""
    key = run_dir.resolve()
    if key in _held:
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirInUse(f"run directory {run_dir} is being written by another cnnjax process "
                          f"(pid {holder}); wait for it to end or stop it, or choose another "
                          f"--run-dir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def close_run_dir(run_dir: pathlib.Path) -> None:
    """Releases the lock `open_run_dir` took (the end of the process releases it too)."""
    fd = _held.pop(pathlib.Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


class Opened(NamedTuple):
    path: pathlib.Path
    resuming: bool
    state: Any  # a new run's initial state; None when resuming


def open_run_dir(run_dir: pathlib.Path | str | None, cfg: Config, primary: bool = True, *,
                 spec: datasets.DatasetSpec | None = None, steps_per_epoch: int = 0,
                 initial_state: Callable[[], Any] | None = None) -> Opened:
    """Opens the run directory of `cfg` (`run_dir`, or a new `default_run_dir`): resuming when it
    holds a run to resume with `cfg`, else created and locked, with config.json and, given `spec`,
    data_spec.json written, and the state `initial_state()` makes. That state is made before
    anything is written, so a run refused there (a transfer.backbone that does not fit) leaves no
    directory.

    Only the primary process creates files and takes the lock; the others only read what is there.
    """
    run_dir = default_run_dir(cfg) if run_dir is None else pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--run-dir {run_dir} is a file, not a directory; give the path of a "
                              f"new directory, or of a run to resume.")
    if (run_dir / "summary.json").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a finished run; choose another "
                              f"--run-dir or delete it.")
    steps = checkpoint_steps(run_dir)
    resuming = bool(steps) and _resumable(run_dir, cfg)
    state = None if resuming or initial_state is None else initial_state()
    if primary:
        with _locked(run_dir, steps), _writing(run_dir, steps):
            if not resuming:
                _start(run_dir, cfg, spec, steps_per_epoch)
    return Opened(run_dir, resuming, state)


def _resumable(run_dir: pathlib.Path, cfg: Config) -> bool:
    """True, or a ValueError naming each setting in which `cfg` differs from the saved run's."""
    diffs = config_differences(read_config(run_dir), cfg)
    if diffs:
        raise ValueError(f"refusing to resume {run_dir} with a different config:\n  "
                         + "\n  ".join(diffs) + "\nResume with the run's own config "
                         f"(cnnjax train --resume {run_dir}) or train into a new --run-dir.")
    return True


@contextlib.contextmanager
def _locked(run_dir: pathlib.Path, steps: list[int]) -> Iterator[None]:
    """The run directory created and locked by this process; a failure inside gives the lock
    back, so a refused run leaves no lock behind."""
    fresh = run_dir.resolve() not in _held
    with _writing(run_dir, steps):
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
    try:
        yield
    except BaseException:
        if fresh:
            close_run_dir(run_dir)
        raise


@contextlib.contextmanager
def _writing(run_dir: pathlib.Path, steps: list[int]) -> Iterator[None]:
    """A write refused while a run directory is opened, as one line: a run to resume keeps its
    checkpoints (`steps`); a new one needs a writable place."""
    try:
        yield
    except OSError as err:
        raise (checkpoint.disk_error(err, run_dir, steps) if steps else disk.disk_error(
            err, run_dir, "Choose a --run-dir on a writable disk with free space.")) or err


# What a run writes besides its checkpoints: cleared when a run that never checkpointed starts again.
RUN_FILES = ("config.json", "metrics.jsonl", "timing.jsonl", "data_spec.json", "tensorboard")


def _clear_run_files(run_dir: pathlib.Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for png in run_dir.glob("*.png"):
        png.unlink()


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """The committed checkpoint steps in the directory, read from its listing."""
    ckpt = pathlib.Path(run_dir) / checkpoint.CKPT_DIR
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def has_checkpoint(run_dir: pathlib.Path) -> bool:
    """Whether the directory holds a checkpoint step, i.e. a run to resume."""
    return bool(checkpoint_steps(run_dir))


def _start(run_dir: pathlib.Path, cfg: Config, spec: datasets.DatasetSpec | None,
           steps_per_epoch: int) -> None:
    """A new run's config.json and, given `spec`, data_spec.json, after what a run stopped before
    its first checkpoint left."""
    if any((run_dir / name).exists() for name in RUN_FILES):
        print(f"{run_dir} holds a run stopped before its first checkpoint: starting it afresh.")
        _clear_run_files(run_dir)
    record = None if spec is None else {"spec": sources.spec_to_dict(spec),
                                        "steps_per_epoch": steps_per_epoch}
    disk.write_atomic(run_dir / "config.json", cfg.to_json() + "\n")
    if record is not None:
        disk.write_atomic(run_dir / DATA_SPEC, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_data_spec(run_dir: pathlib.Path) -> tuple[datasets.DatasetSpec, int] | None:
    path = pathlib.Path(run_dir) / DATA_SPEC
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return sources.spec_from_dict(record["spec"]), int(record["steps_per_epoch"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); restore it from a "
                         f"copy.") from None
