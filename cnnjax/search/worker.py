"""A search worker: fills a study with trials, each one a `cnnjax train` run of its own.

`run_search(cfg, space, study_dir, trials)` is `cnnjax search`. Any number of workers, on one
machine or many (`storage`), run the same call; each asks Optuna for the next trial, trains it
into `<study>/trials/<number>/` with the trial's overrides on `cfg`, and tells Optuna the run's
`train.monitor` at its best epoch on validation (test figures are recorded, never used to
choose). A worker stops once the study holds `trials` finished trials (complete, pruned, or failed
on their own, such as a diverging run), so the same command run again after a crash finishes
the study, and run on a finished study does nothing.

Crashes: a worker holds a lock file (`<study>/workers/<id>.lock`, an flock the kernel drops when
it dies) for its whole life, and tags each trial it runs with its id. A trial left running by a
worker of this machine whose lock is free was left by a dead worker: it is failed and queued again
with its parameters (Optuna's `RetryHeartbeatStaleTrialCallback`), and whichever worker takes the
queued trial moves the old run directory to the new trial's and resumes it from its last
checkpoint. On a database shared by many machines, a dead worker's trial is found by Optuna's
heartbeat instead and queued the same way (its checkpoints, on the dead machine, stay there: the
trial starts afresh with the same parameters).

Reproducibility: the sampler is made anew for each trial, seeded from the study's seed and the
trial's position among the study's trials proper (trials a dead worker left do not count), so a
one-worker study proposes the same trials on a rerun, and one interrupted and continued proposes
what an uninterrupted one would.

Preemption: the worker holds `preempt.handling()` for its whole life. SIGTERM or Ctrl-C during a
trial checkpoints that run at the next step and queues the trial again; between trials it stops
the worker before the next one. `run_search` then returns with `preempted` naming the signal
(`cnnjax search` exits 143 or 130), and the same command continues the study, the trial resuming
from its checkpoint to the bytes of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from cnnjax.config import Config
from cnnjax.data import input_pipeline
from cnnjax.report import logs
from cnnjax.search import batch, record
from cnnjax.search.pruning import PRUNERS, ReportToTrial, make_pruner, report_epochs
from cnnjax.search.space import Space, load_space, space_differences
from cnnjax.search.storage import JOURNAL, open_storage, optuna_quiet, redacted
from cnnjax.training import builder, grid as grids, preempt, rundir
from cnnjax.training.loop import train_and_evaluate
from cnnjax.training.runset import NOT_SETTINGS, STUDY_FILE, flat_config

SAMPLERS = ("tpe", "random", "grid", "cmaes")
WORKERS_DIR, TRIALS_DIR = "workers", "trials"
# A trial that a worker of this machine asked for but had not yet tagged with its id: how long
# after its start it may be taken for the trial of a worker that died in between.
UNTAGGED_GRACE_S = 300


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How a study searches; stored with the study, and a rerun must agree on them."""

    trials: int
    sampler: str = "tpe"
    pruner: str = "median"
    study_seed: int = 0
    storage: str | None = None
    heartbeat: int = 60  # seconds between a running trial's heartbeats on a database storage
    batch: int = 1  # trials trained at once, as one sweep (cnnjax/search/batch.py)
    lowering: str | None = None  # the batch sweep's lowering (None: the sweep's default)

    def __post_init__(self):
        if self.trials <= 0:
            raise ValueError(f"--trials must be at least 1, got {self.trials}: it is the number "
                             f"of finished trials the study should hold.")
        if self.batch <= 0:
            raise ValueError(f"--batch must be at least 1, got {self.batch}: the trials trained "
                             f"at once.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}.")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner {self.pruner!r} is not one of {', '.join(PRUNERS)}.")


class TrialFailed(Exception):
    """A trial's run failed on its own (it diverged): the trial is failed, the search goes on."""


class SurplusTrial(Exception):
    """A proposal drawn while other workers filled the study: dropped, never trained."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C: the running trial checkpointed and is queued again; the worker stops."""

    def __init__(self, signal: str):
        super().__init__(signal)
        self.signal = signal


def make_sampler(settings: SearchSettings, space: Space, position: int
                 ) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for the trial at `position`, seeded from the study's seed and it (the grid
    sampler from the study's seed alone: its seed orders the whole grid, each trial takes the
    next point not yet visited)."""
    seed = int(np.random.SeedSequence([settings.study_seed, position]).generate_state(1)[0])
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=settings.study_seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def default_study_dir(space: Space) -> pathlib.Path:
    return rundir.DEFAULT_ROOT / f"search-{space.name}"


def trial_config(cfg: Config, overrides: dict[str, Any]) -> Config:
    for key, value in overrides.items():
        cfg = cfg.set(key, value)
    return cfg


def preflight(cfg: Config, space: Space) -> None:
    """Builds (abstractly, nothing compiles) the fixed config and, for a space file, the config
    with each choice and each range's bounds, so a value that no run can take is named before any
    trial starts."""
    spec = input_pipeline.data_spec(cfg.data)
    builder.build(cfg, spec, steps_per_epoch=1)
    for p in space.params:
        values = (p.choices if p.choices is not None
                  else (p.distribution.low, p.distribution.high))
        for value in values:
            one = cfg.set(p.key, value)
            try:
                builder.build(one, spec if not p.key.startswith("data.")
                              else input_pipeline.data_spec(one.data), steps_per_epoch=1)
            except ValueError as err:
                raise ValueError(f"search space {p.key!r}: the value {value!r} does not fit: "
                                 f"{err}") from None


def _fixed(cfg: Config) -> dict[str, Any]:
    """The fixed config as a study compares it across workers (machine-local paths aside)."""
    return {k: v for k, v in flat_config(cfg).items() if k not in NOT_SETTINGS}


def open_study(cfg: Config, space: Space, settings: SearchSettings, study_dir: pathlib.Path
               ) -> optuna.Study:
    """Creates the study (named by the directory's last component) or joins it, refusing one
    that holds another space, fixed config or sampler."""
    storage = open_storage(study_dir, settings.storage, settings.heartbeat)
    direction = "minimize" if cfg.train.monitor == "val_loss" else "maximize"
    meta = {"space": space.described, "fixed": _fixed(cfg), "sampler": settings.sampler,
            "pruner": settings.pruner, "study_seed": settings.study_seed,
            "monitor": cfg.train.monitor}
    with optuna_quiet():
        study = optuna.create_study(study_name=study_dir.name, storage=storage,
                                    direction=direction, load_if_exists=True)
    stored = study.user_attrs.get(record.SEARCH_ATTR)
    if stored is None:
        study.set_user_attr(record.SEARCH_ATTR, meta)
        return study
    lines = [f"space: {d}" for d in space_differences(stored["space"], meta["space"])]
    lines += [f"{k}: {stored['fixed'].get(k, '(unset)')!r} -> {meta['fixed'].get(k, '(unset)')!r}"
              for k in dict.fromkeys([*stored["fixed"], *meta["fixed"]])
              if stored["fixed"].get(k) != meta["fixed"].get(k)]
    lines += [f"{k}: {stored[k]!r} -> {meta[k]!r}" for k in ("sampler", "pruner", "study_seed",
                                                            "monitor") if stored[k] != meta[k]]
    if lines:
        raise ValueError(f"study {study_dir.name!r} ({redacted(settings.storage) if settings.storage else study_dir}) "
                         f"was started with another search:\n  " + "\n  ".join(lines) +
                         "\nRun it with the settings it was started with, or give a new --study.")
    return study


class Worker:
    """One process's part of a study: its lock, its id, the trials it runs."""

    def __init__(self, study: optuna.Study, cfg: Config, space: Space, settings: SearchSettings,
                 study_dir: pathlib.Path, callbacks: Sequence[Any] = (), quiet: bool = False):
        self.study, self.cfg, self.space, self.settings = study, cfg, space, settings
        self.study_dir, self.callbacks, self.quiet = study_dir, list(callbacks), quiet
        self.id, self.host = uuid.uuid4().hex[:12], socket.gethostname()
        (study_dir / WORKERS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = _hold(study_dir / WORKERS_DIR / f"{self.id}.lock")
        self.ran: list[dict[str, Any]] = []  # this worker's trials: number, seconds

    def close(self) -> None:
        os.close(self._lock)
        with contextlib.suppress(FileNotFoundError):
            (self.study_dir / WORKERS_DIR / f"{self.id}.lock").unlink()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def say_trial(self, number: int, overrides: dict[str, Any]) -> None:
        self.say(f"trial {number}: " + " ".join(f"{k}={_short(v)}" for k, v in overrides.items()))

    # -- crashed workers of this machine ------------------------------------------------------
    def take_over_dead(self) -> None:
        """Fails and queues again every running trial whose worker on this machine has died."""
        now = time.time()
        by_worker: dict[str, list[FrozenTrial]] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(record.HOST, self.host) != self.host:
                continue  # another machine's: its heartbeat tells
            worker = t.user_attrs.get(record.WORKER)
            if worker is None and t.datetime_start and \
                    now - t.datetime_start.timestamp() < UNTAGGED_GRACE_S:
                continue  # just asked for by a worker that has not tagged it yet
            by_worker.setdefault(worker or "", []).append(t)
        for worker, trials in by_worker.items():
            if worker == self.id:
                continue
            lock = self.study_dir / WORKERS_DIR / f"{worker}.lock"
            fd = _try_hold(lock) if worker else None
            if worker and fd is None:
                continue  # alive (or another worker is taking its trials over now)
            try:
                for t in trials:
                    self._requeue(t, "its worker died")
            finally:
                if fd is not None:
                    os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()

    def _requeue(self, t: FrozenTrial, why: str) -> None:
        try:
            if not self.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker got there first
        RetryHeartbeatStaleTrialCallback()(self.study, self.study._storage.get_trial(t._trial_id))
        self.say(f"trial {t.number}: {why}; queued again with its parameters")

    # -- the study loop -----------------------------------------------------------------------
    def position(self, trials: list[FrozenTrial], number: int | None = None) -> int:
        """How many trials proper come before `number` (before a new one when None)."""
        return sum(1 for t in record.counted(trials) if number is None or t.number < number)

    def open_slots(self) -> tuple[int, int]:
        """(finished trials, trials this worker may still start)."""
        trials = self.study.get_trials(deepcopy=False)
        done = len(record.finished(trials))
        running = [t for t in record.counted(trials) if t.state == TrialState.RUNNING]
        return done, self.settings.trials - done - len(running)

    def run(self) -> None:
        target = self.settings.trials
        if self.settings.sampler == "grid":
            target = min(target, self.space.grid_size())
        while True:
            t0 = time.perf_counter()  # the search's own cost: all of an iteration but training
            self.take_over_dead()
            done, slots = self.open_slots()
            if done >= target or slots <= 0:
                break
            position = self.position(self.study.get_trials(deepcopy=False))
            ran = len(self.ran)
            if self.settings.batch > 1:
                batch.run_batch(self, position, target, min(self.settings.batch, slots))
            else:
                self._run_one(position, target)
            self.write()
            if self.settings.batch == 1 and len(self.ran) > ran:
                trial = self.ran[-1]
                trial["overhead_s"] = time.perf_counter() - t0 - trial["train_s"]
            if preempt.requested():  # a signal came between two trials, or during a last one
                raise Preempted(preempt.requested())

    def _run_one(self, position: int, target: int) -> None:
        """One trial, through Optuna's optimize."""
        self.study.sampler = make_sampler(self.settings, self.space, position)
        self.study.pruner = make_pruner(self.settings.pruner, self.cfg.train.epochs)
        try:
            self.study.optimize(lambda trial: self.objective(trial, position, target),
                                n_trials=1, catch=(TrialFailed, SurplusTrial),
                                gc_after_trial=False)
        except (KeyboardInterrupt, Preempted):
            self._interrupted()
            raise

    def _interrupted(self) -> None:
        """Ctrl-C or SIGTERM: the trial just failed by Optuna is queued again, to resume from its
        last checkpoint when the study is run again."""
        mine = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get(record.WORKER) == self.id
                and not t.user_attrs.get(record.FAILED_REASON)
                and not t.user_attrs.get(record.SURPLUS)]
        again = record.retried(self.study.get_trials(deepcopy=False))
        for t in mine:
            if t.number not in again:
                RetryHeartbeatStaleTrialCallback()(self.study, t)
                self.say(f"trial {t.number}: interrupted; it resumes from its last checkpoint "
                         f"when the same command runs again")
        self.write()

    def write(self) -> None:
        record.write_study_json(record.study_record(self.study, self.study_dir,
                                                    self.settings.trials), self.study_dir)

    def objective(self, trial: optuna.Trial, asked_at: int, target: int) -> float:
        trials = self.study.get_trials(deepcopy=False)
        position = self.position(trials, trial.number)
        trial.set_user_attr(record.WORKER, self.id)
        trial.set_user_attr(record.HOST, self.host)
        if position >= target:
            trial.set_user_attr(record.SURPLUS, True)
            raise SurplusTrial(f"trial {trial.number}: the study already holds {target} trials")
        if position != asked_at:  # another worker asked at the same time: draw as this position
            self.study.sampler = make_sampler(self.settings, self.space, position)
        overrides = self.space.suggest(trial)
        cfg = trial_config(self.cfg, overrides)
        run_dir = self.study_dir / TRIALS_DIR / str(trial.number)
        frozen = next(t for t in trials if t.number == trial.number)
        self._adopt_run_dir(trial.number, RetryHeartbeatStaleTrialCallback.retry_history(frozen),
                            run_dir)
        trial.set_user_attr(record.RUN_DIR, str(run_dir.relative_to(self.study_dir)))
        self.say_trial(trial.number, overrides)
        t0 = time.perf_counter()
        reporter = ReportToTrial(trial)
        if (run_dir / "summary.json").is_file():  # trained, but its worker died before telling
            summary = _report_finished(trial, run_dir, cfg.train.monitor)
        else:
            try:
                result = train_and_evaluate(cfg, run_dir, callbacks=[reporter, *self.callbacks])
            except FloatingPointError as err:
                trial.set_user_attr(record.FAILED_REASON, str(err).split(" Last good")[0])
                self.say(f"trial {trial.number}: failed: {err}")
                raise TrialFailed(str(err)) from None
            if result.preempted and not result.finished:  # checkpointed: it resumes
                self.say(f"trial {trial.number}: {result.stop_reason}")
                raise Preempted(result.preempted)
            if not result.finished:
                trial.set_user_attr(record.PRUNED_AT, reporter.pruned_at)
                trial.set_user_attr("train_seconds", time.perf_counter() - t0)
                self.ran.append({"number": trial.number, "train_s": time.perf_counter() - t0})
                self.say(f"trial {trial.number}: {result.stop_reason}")
                if reporter.pruned_at is None:  # stopped by a user's callback: resumable
                    raise TrialFailed(result.stop_reason or "stopped")
                raise optuna.TrialPruned(result.stop_reason)
            summary = result.summary
        train_s = time.perf_counter() - t0
        monitor = cfg.train.monitor
        value = float(summary["val"]["loss" if monitor == "val_loss" else "accuracy"])
        trial.set_user_attr("train_seconds", train_s)
        trial.set_user_attr("best_epoch", summary["best_epoch"])
        trial.set_user_attr("epochs", summary["epochs_run"])
        trial.set_user_attr("test", {k: summary["test"][k] for k in ("loss", "accuracy")})
        self.ran.append({"number": trial.number, "train_s": train_s})
        self.say(f"trial {trial.number}: {monitor} {value:.4f} at epoch {summary['best_epoch']} "
                 f"({train_s:.0f} s)")
        return value

    def _adopt_run_dir(self, number: int, history: list[int], run_dir: pathlib.Path) -> None:
        """A trial continuing one whose worker died takes over that trial's run directory."""
        for old in reversed(history):
            old_dir = self.study_dir / TRIALS_DIR / str(old)
            if old_dir.is_dir() and not run_dir.exists():
                os.replace(old_dir, run_dir)
                self.say(f"trial {number}: continues trial {old} from its run directory")
                return


def _report_finished(trial: optuna.Trial, run_dir: pathlib.Path, monitor: str) -> dict[str, Any]:
    """A run that finished before its worker could tell: its epochs reported, its summary read
    back."""
    report_epochs(trial, run_dir, monitor)
    return rundir.read_summary(run_dir)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hold(path: pathlib.Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _try_hold(path: pathlib.Path) -> int | None:
    """The lock of a dead worker (its file descriptor), or None while its worker lives."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def run_search(cfg: Config, space: str | pathlib.Path | dict | Callable, trials: int,
               study_dir: pathlib.Path | str | None = None, *, storage: str | None = None,
               sampler: str = "tpe", pruner: str = "median", study_seed: int = 0,
               heartbeat: int = 60, batch: int = 1, lowering: str | None = None,
               callbacks: Sequence[Any] = (), quiet: bool = False) -> dict[str, Any]:
    """Fills the study in `study_dir` (default checkpoints/search-<space>) with `trials` finished
    trials of `cfg` with the space's overrides, as one worker; returns study.json's content with
    this worker's trials under `worker`, and under `preempted` the signal that stopped it before
    the study was full (exit with `preempt.exit_status(...)`), else None."""
    settings = SearchSettings(trials=trials, sampler=sampler, pruner=pruner,
                              study_seed=study_seed, storage=storage, heartbeat=heartbeat,
                              batch=batch, lowering=lowering)
    space = load_space(space, cfg)
    if batch > 1:
        _check_batch(cfg, space, batch, callbacks)
    if settings.sampler == "grid":
        space.grid()  # a space grid cannot take is refused before anything else
    study_dir = pathlib.Path(study_dir) if study_dir is not None else default_study_dir(space)
    preflight(cfg, space)
    study = open_study(cfg, space, settings, study_dir)
    worker = Worker(study, cfg, space, settings, study_dir, callbacks, quiet)
    stopped_by = None
    try:
        with optuna_quiet(), preempt.handling():
            done, _ = worker.open_slots()
            if done >= settings.trials:
                worker.say(f"study {study_dir.name} already holds {done} finished trials: "
                           f"nothing to do")
            try:
                worker.run()
            except Preempted as stop:
                stopped_by = stop.signal
            worker.write()
            out = record.study_record(study, study_dir, settings.trials)
        if stopped_by is None:
            worker.say(record.table(out))
    finally:
        worker.close()
    return {**out, "study_dir": str(study_dir), "worker": worker.ran, "preempted": stopped_by}


def _check_batch(cfg: Config, space: Space, size: int, callbacks: Sequence[Any]) -> None:
    """What a batch of trials trained as one sweep cannot take, refused before any trial."""
    if callbacks:
        raise ValueError(f"--batch {size}: a batch trains its trials as one sweep, which runs the "
                         f"built-in callbacks only; search with --batch 1 to use callbacks.")
    batch.check_keys([p.key for p in space.params], size)
    grids.make_plan(cfg, [cfg.train.seed], "loop")  # what a sweep refuses of the fixed config


def show(study_dir: pathlib.Path | str, storage: str | None = None) -> str:
    """The table of a study as its storage holds it now (study.json rewritten), or of study.json
    alone when the storage is not reachable from here."""
    study_dir = pathlib.Path(study_dir)
    prior = study_dir / STUDY_FILE
    saved = json.loads(prior.read_text(encoding="utf-8")) if prior.is_file() else None
    if storage is None and not (study_dir / JOURNAL).is_file():
        if saved is None:
            raise FileNotFoundError(f"{study_dir} holds no study (neither {JOURNAL} nor "
                                    f"{STUDY_FILE}); give the --study of a cnnjax search, and "
                                    f"--storage if it lives in a database.")
        return record.table(saved)
    try:
        with optuna_quiet():
            loaded = optuna.load_study(study_name=study_dir.name,
                                       storage=open_storage(study_dir, storage, 60))
    except KeyError:
        raise ValueError(f"no study named {study_dir.name!r} in "
                         f"{redacted(storage) if storage else study_dir / JOURNAL}.") from None
    out = record.study_record(loaded, study_dir, (saved or {}).get("target_trials", 0))
    record.write_study_json(out, study_dir)
    return record.table(out)
