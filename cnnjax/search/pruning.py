"""Pruning: a callback that reports a trial's monitored figure every epoch and stops the run when
Optuna's pruner says so.

The figure reported is the run's own `train.monitor` on validation at the epoch's end (never a
test figure). A pruned run stops at that epoch's checkpoint, so its directory stays a resumable
run, and the trial is marked pruned at that epoch. The reports go into the checkpoints too
(`state_dict`): a trial resumed after its worker died reports its earlier epochs again to the
trial that continues it, so the pruner sees the same history.
"""

from __future__ import annotations

import pathlib
from typing import Any

import optuna

from cnnjax.report import logs
from cnnjax.training.callbacks import Callback, EpochEvent, Event

PRUNERS = ("median", "hyperband", "halving", "none")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner by its short name: the median rule (once 5 trials completed, from the
    first epoch's end on), successive halving / Hyperband over the run's epochs, or none."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"--pruner {name!r} is not one of {', '.join(PRUNERS)}.")


def report_epochs(trial: optuna.Trial, run_dir: pathlib.Path, monitor: str) -> None:
    """Reports a run's epochs to the trial after the fact, from its metrics.jsonl (a run trained
    while no one listened: in a batch, or before its worker died)."""
    for line in logs.read_jsonl(run_dir / "metrics.jsonl"):
        if line.get("kind") == "epoch":
            trial.report(float(line[monitor]), int(line["epoch"]))


class ReportToTrial(Callback):
    """Reports `train.monitor` to the trial at every epoch's end; stops the run when pruned."""

    name = "search_pruning"

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.reported: list[tuple[int, float]] = []
        self.pruned_at: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"reported": [list(r) for r in self.reported]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reported = [(int(e), float(v)) for e, v in state.get("reported", [])]

    def on_train_start(self, event: Event) -> None:
        for epoch, value in self.reported:  # a resumed trial: the epochs it ran before
            self.trial.report(value, epoch)

    def on_epoch_end(self, event: EpochEvent) -> None:
        epoch, value = event.record["epoch"], float(event.record[event.config.train.monitor])
        self.trial.report(value, epoch)
        self.reported.append((epoch, value))
        if self.trial.should_prune():
            self.pruned_at = epoch
            event.control.stop(f"pruned at epoch {epoch} ({event.config.train.monitor} "
                               f"{value:.4f})")
