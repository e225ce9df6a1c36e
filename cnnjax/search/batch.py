"""A batch of trials: K proposals asked at once and trained as the members of one sweep.

`cnnjax search --batch K` (`run_search(..., batch=K)`) asks Optuna for K trials, each with the
sampler seeded by its position as a one-at-a-time worker seeds it, and trains them with
`run_sweep(points=...)` into `<study>/batches/<first trial>/`: one program for all K under the
'vmap' lowering (the default off CPU), each trial's run directory its member's, so every trial is
still a run that `load_run`, `cnnjax compare` and `cnnjax ensemble` read. A space may hold only
values a sweep can vary (cnnjax/training/grid.py: optimizer scalars, dropout rates, label
smoothing, augmentation magnitudes, the plateau and early-stopping settings); any other key is
refused before a trial trains. Trials of a batch are not pruned: they train side by side to their
own end (early stopping still ends each on its own); their epochs are reported to Optuna after.

A member that diverges fails its trial with the reason, the others go on. SIGTERM or Ctrl-C
checkpoints every member and queues the K trials again; so does a worker's death (its trials are
queued again by the next worker, as single trials are). The next worker that asks for a batch
gets those K trials back in order and, finding their old batch directory with the same value
sets, resumes that sweep, to the bytes of one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's own, as optimize() uses it
from optuna.trial import TrialState

from cnnjax.search import record
from cnnjax.search.pruning import report_epochs
from cnnjax.training import grid as grids
from cnnjax.training.sweep import SWEEP_FILE, run_sweep

if TYPE_CHECKING:
    from cnnjax.search.worker import Worker

BATCHES_DIR = "batches"
BATCH = "batch"  # a trial's user attr: its batch directory, relative to the study


def check_keys(keys, batch: int) -> None:
    """Refuses a key that one sweep cannot vary, naming it and why."""
    for key in keys:
        if key not in grids.GRIDDABLE:
            raise ValueError(f"--batch {batch}: the space's {key} cannot vary within one "
                             f"program ({grids.why_not(key)}); search it with --batch 1.")


def run_batch(worker: "Worker", position: int, target: int, size: int) -> list[int]:
    """Asks for and trains up to `size` trials as one sweep; returns the trained trials' numbers.
    Raises the worker's Preempted after queueing the batch again when a signal stopped it."""
    from cnnjax.search.worker import Preempted, make_sampler

    study, asked = worker.study, []
    for i in range(size):
        study.sampler = make_sampler(worker.settings, worker.space, position + i)
        trial = study.ask()
        trial.set_user_attr(record.WORKER, worker.id)
        trial.set_user_attr(record.HOST, worker.host)
        at = worker.position(study.get_trials(deepcopy=False), trial.number)
        if at >= target:  # another worker filled the study meanwhile
            trial.set_user_attr(record.SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        if at != position + i:
            study.sampler = make_sampler(worker.settings, worker.space, at)
        asked.append((trial, worker.space.suggest(trial)))
    if not asked:
        return []
    try:
        check_keys(asked[0][1], worker.settings.batch)
    except ValueError:
        for trial, _ in asked:  # dropped, never trained
            trial.set_user_attr(record.SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
        raise

    points = list(dict.fromkeys(json.dumps(values) for _, values in asked))
    value_sets = [json.loads(p) for p in points]
    batch_dir = worker.study_dir / BATCHES_DIR / str(asked[0][0].number)
    _adopt(worker, [t for t, _ in asked], points, batch_dir)
    names = grids.make_plan(worker.cfg, [worker.cfg.train.seed], "loop",
                            points=value_sets).members()
    member_of = {p: m.name for p, m in zip(points, names)}
    for trial, values in asked:
        run_dir = batch_dir / member_of[json.dumps(values)]
        trial.set_user_attr(record.RUN_DIR, str(run_dir.relative_to(worker.study_dir)))
        trial.set_user_attr(BATCH, str(batch_dir.relative_to(worker.study_dir)))
        worker.say_trial(trial.number, values)
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as beats:
            for trial, _ in asked:
                beats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
            summary = run_sweep(worker.cfg, None, batch_dir, worker.settings.lowering,
                                points=value_sets)
    except BaseException:
        _queue_again(worker, [t for t, _ in asked], "interrupted")
        raise
    if summary["preempted"] and summary["status"] != "finished":
        _queue_again(worker, [t for t, _ in asked], f"stopped by {summary['preempted']}")
        raise Preempted(summary["preempted"])
    seconds = (time.perf_counter() - t0) / len(asked)
    outcomes = {m["name"]: m for m in summary["members"]}
    monitor = worker.cfg.train.monitor
    for trial, values in asked:
        name = member_of[json.dumps(values)]
        _tell(worker, trial, outcomes[name], batch_dir / name, monitor, seconds)
        worker.ran.append({"number": trial.number, "train_s": seconds})
    return [t.number for t, _ in asked]


def _tell(worker: "Worker", trial: optuna.Trial, outcome: dict[str, Any], run_dir: pathlib.Path,
          monitor: str, seconds: float) -> None:
    """Reports a member's epochs to its trial, then completes or fails the trial."""
    report_epochs(trial, run_dir, monitor)
    trial.set_user_attr("train_seconds", seconds)
    if outcome["status"] != "finished":
        trial.set_user_attr(record.FAILED_REASON, outcome.get("reason", outcome["status"]))
        worker.study.tell(trial, state=TrialState.FAIL)
        worker.say(f"trial {trial.number}: failed: {outcome.get('reason', outcome['status'])}")
        return
    value = float(outcome["val"]["loss" if monitor == "val_loss" else "accuracy"])
    trial.set_user_attr("best_epoch", outcome["best_epoch"])
    trial.set_user_attr("epochs", outcome["epochs_run"])
    trial.set_user_attr("test", {k: outcome["test"][k] for k in ("loss", "accuracy")})
    worker.study.tell(trial, value)
    worker.say(f"trial {trial.number}: {monitor} {value:.4f} at epoch {outcome['best_epoch']}")


def _queue_again(worker: "Worker", trials: list[optuna.Trial], why: str) -> None:
    """Fails the batch's running trials and queues them again, in order, with their parameters."""
    numbers = {t.number for t in trials}
    for frozen in worker.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if frozen.number in numbers:
            worker._requeue(frozen, why)
    worker.say(f"trials {', '.join(str(n) for n in sorted(numbers))} resume from their "
               f"checkpoints when a worker with --batch {len(trials)} runs")
    worker.write()


def _adopt(worker: "Worker", trials: list[optuna.Trial], points: list[str],
           batch_dir: pathlib.Path) -> None:
    """Trials that continue one stopped batch, in its order, take over its directory."""
    by_number = {t.number: t for t in worker.study.get_trials(deepcopy=False)}
    olds = set()
    for trial in trials:
        history = RetryHeartbeatStaleTrialCallback.retry_history(by_number[trial.number])
        if not history:
            return
        olds.add(by_number[history[-1]].user_attrs.get(BATCH))
    if len(olds) != 1 or None in olds or batch_dir.exists():
        return
    old_dir = worker.study_dir / olds.pop()
    try:
        plan = json.loads((old_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if [json.dumps(dict(p)) for p in plan.get("points", [])] != points:
        return
    os.replace(old_dir, batch_dir)
    worker.say(f"batch {batch_dir.name}: continues batch {old_dir.name} from its directory")

