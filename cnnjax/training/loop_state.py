"""What changes as a run trains, besides the train state: one small immutable value.

`LoopState` is where the loop stands (epoch, batch within it), the best epoch so far and its
monitored figure (named by `train.monitor`: a best `val_accuracy` holds the accuracy), the early
stopping count, this epoch's per-step figures and the wall-clock record. Each stage of the loop
takes one and returns the next; every checkpoint saves it as JSON beside the train state, so a
resumed run continues from exactly where it stood. What describes the run (config, data, model,
mesh, run directory) lives apart, in the loop's `Run`, and never changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax.training.early_stopping import EarlyStopping


@dataclasses.dataclass(frozen=True)
class Best:
    """The best epoch so far by the monitored figure (`train.monitor`)."""

    monitor: str = "val_loss"  # 'val_loss' (lower is better) or 'val_accuracy' (higher is)
    value: float | None = None  # the monitored figure at that epoch; None before any
    epoch: int = 0
    step: int = 0

    def improves(self, value: float, patience: int, bad_epochs: int) -> tuple[bool, int, bool]:
        """(improved, bad epochs after this one, stop): flax's early-stopping rule, on the figure
        to minimize (the loss, or the accuracy negated)."""
        sign = -1.0 if self.monitor == "val_accuracy" else 1.0
        best = float("inf") if self.value is None else sign * self.value
        rule = EarlyStopping(patience=patience, best_metric=best,
                             patience_count=bad_epochs).update(sign * value)
        return bool(rule.has_improved), int(rule.patience_count), bool(rule.should_stop)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, self.monitor: self.value}


@dataclasses.dataclass(frozen=True)
class Timing:
    """The wall-clock record (timing.jsonl and summary.json's rates), kept across resumes."""

    epoch_rates: tuple[float, ...] = ()  # training images/s of each epoch
    epoch_seconds: tuple[float, ...] = ()  # each epoch's wall time, evaluation included
    checkpoint_seconds: float = 0.0  # blocked on saves, as counted in the epochs' timing lines
    unlogged_checkpoint_seconds: float = 0.0  # blocked since the last timing line
    first_step_s: float | None = None  # the first step's wall time: compile, mostly


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Where the loop stands; `stop_reason` (a callback's stop or a signal's) and `preempted` (the
    signal's name) are not saved: a resumed run goes on. `pending` holds the steps of the log
    window not yet written (a checkpoint between two log lines: a preempted run), so the resumed
    run writes the same line."""

    epoch: int = 1  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained
    best: Best = Best()
    bad_epochs: int = 0  # epochs since the best, for early stopping
    stopped_early: bool = False
    epoch_steps: tuple[tuple[float, float], ...] = ()  # (loss, accuracy) of this epoch's steps
    last_checkpoint_step: int = 0
    timing: Timing = Timing()
    callbacks: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # each one's state_dict
    pending: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # StepLog.to_json
    stop_reason: str | None = None
    preempted: str | None = None  # SIGTERM or SIGINT: stopped by that signal

    def replace(self, **changes) -> "LoopState":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "best": self.best.to_json(),
                "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
                "epoch_steps": [list(s) for s in self.epoch_steps],
                "last_checkpoint_step": self.last_checkpoint_step,
                "timing": dataclasses.asdict(self.timing), "callbacks": dict(self.callbacks),
                **({"pending": dict(self.pending)} if self.pending else {})}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], monitor: str) -> "LoopState":
        """The saved value; a checkpoint of an earlier cnnjax (its `Progress`) is read as well."""
        if "best" not in d:
            return _from_progress(d, monitor)
        best = dict(d["best"])
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]),
                   best=Best(monitor, best.get(monitor), int(best["epoch"]), int(best["step"])),
                   bad_epochs=int(d["bad_epochs"]), stopped_early=bool(d["stopped_early"]),
                   epoch_steps=tuple(tuple(s) for s in d["epoch_steps"]),
                   last_checkpoint_step=int(d["last_checkpoint_step"]),
                   timing=_timing(d["timing"]), callbacks=dict(d["callbacks"]),
                   pending=dict(d.get("pending") or {}))


def best_step_of(d: Mapping[str, Any]) -> int:
    """The best step a saved loop state records (0: no epoch has ended), of either layout."""
    return int(d["best"]["step"] if "best" in d else d.get("best_step") or 0)


def _timing(d: Mapping[str, Any]) -> Timing:
    return Timing(tuple(d["epoch_rates"]), tuple(d["epoch_seconds"]),
                  float(d["checkpoint_seconds"]), float(d.get("unlogged_checkpoint_seconds", 0.0)),
                  d["first_step_s"])


def _from_progress(d: Mapping[str, Any], monitor: str) -> LoopState:
    """An earlier cnnjax's Progress, whose `best_val_loss` held the figure minimized: the loss, or
    1 - accuracy for `train.monitor=val_accuracy`."""
    stored = d.get("best_val_loss")
    value = stored if stored is None or monitor == "val_loss" else 1.0 - stored
    return LoopState(epoch=int(d["epoch"]), batch=int(d["batch"]),
                     best=Best(monitor, value, int(d["best_epoch"]), int(d["best_step"])),
                     bad_epochs=int(d["patience_count"]), stopped_early=bool(d["stopped_early"]),
                     epoch_steps=tuple(tuple(s) for s in d["epoch_steps"]),
                     last_checkpoint_step=int(d["last_checkpoint_step"]),
                     timing=_timing(d), callbacks=dict(d["callbacks"]))
