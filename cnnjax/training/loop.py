"""The training loop as stages a script can call, in the order one batch goes through them:

    run, state, loop = setup(cfg, run_dir)       # data, the run's parts, run directory, resume
    loop = start(run, state, loop, callbacks)    # the callbacks' saved state, on_train_start
    for epoch in run.epochs(loop):
        state, loop = train_epoch(run, state, loop, callbacks)   # the epoch's steps
        state, loop = end_epoch(run, state, loop, callbacks)     # eval, plateau, early stop, ckpt
        if loop.stop_reason or loop.stopped_early:
            break
    result = finish(run, state, loop, callbacks)  # best parameters, test, summary.json

`train_and_evaluate(cfg, run_dir, callbacks=[...])` is exactly that, with `default_callbacks`
(logs, TensorBoard, progress bar, checkpoints, ...) before the caller's own. `RunSetup` describes the
run and never changes; `LoopState` (cnnjax/training/loop_state.py) is what changes, handed from
stage to stage. Every check that can fail on the user's input runs in `setup`, before anything is
compiled (`builder.build`).

`train_epoch` is made of pieces that `cnnjax sweep` runs for each of its members around a step
shared by all of them: `open_epoch`, `after_step` (hooks, the log line, whether to checkpoint),
`checkpoint_here` and `end_train`; `setup` is `open_run` after loading the data and building.

Resume is exact: a checkpoint holds the train state and the loop state; batch order is a
function of (seed, epoch) and every random draw of (key, step, example), so a resumed run writes
the same metrics.jsonl, byte for byte, as one that never stopped. SIGTERM and Ctrl-C
(cnnjax/training/preempt.py) checkpoint at the next step boundary, with the log window not yet
written, and stop.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from cnnjax.config import Config
from cnnjax.data import input_pipeline
from cnnjax.report import logs, plots
from cnnjax.training import builder, checkpoint, parallel, preempt, rundir
from cnnjax.training.builder import RunParts
from cnnjax.training.losses import NonFiniteLoss, NonFiniteStep
from cnnjax.training.callbacks import (Callback, CallbackError, CallbackList, Control, EndEvent,
                                       EpochEvent, Event, LogEvent, StepEvent, default_callbacks)
from cnnjax.training.periodic import is_due
from cnnjax.training.loop_state import LoopState
from cnnjax.training.steps import TrainState


class StepLog:
    """Per-step metrics kept on device and pulled to the host once per log line: every
    `train.log_every` steps (`is_due`) and at an epoch's last step."""

    def __init__(self, every: int, first_step: int, pending: Sequence[dict] = ()):
        self.every, self.first_step = every, first_step  # first_step: of the first pending metrics
        self.pending: list[dict] = list(pending)

    def add(self, metrics: dict) -> bool:
        """Keeps a step's metrics; True when a log line is due after it."""
        self.pending.append(metrics)
        return is_due(self.first_step + len(self.pending) - 1, self.every)

    def pull(self, epoch: int) -> tuple[dict[str, Any], list[tuple[float, float]]] | None:
        """(the window's metrics.jsonl record, each step's (loss, accuracy)), one host sync;
        raises on the first non-finite step."""
        if not self.pending:
            return None
        window = jax.device_get(self.pending)
        self.pending = []
        for i, m in enumerate(window):
            if not m["finite"]:
                loss, norm, step = float(m["loss"]), float(m["grad_norm"]), self.first_step + i
                at = f"at step {step} (epoch {epoch}); the update was not applied."
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"the loss is {loss} {at} Check the loss and the data (a "
                                        f"log of 0, a division by 0), or lower "
                                        f"optim.learning_rate.", step)
                raise NonFiniteStep(f"non-finite gradient norm ({norm}) {at} Lower "
                                    f"optim.learning_rate or check the data.", step)
        keys = [k for k in window[0] if k != "finite"]
        record = {k: float(np.mean([m[k] for m in window])) for k in keys}
        last = self.first_step + len(window) - 1
        self.first_step = last + 1
        return ({"kind": "step", "epoch": epoch, "step": last, **record},
                [(float(m["loss"]), float(m["accuracy"])) for m in window])

    def to_json(self) -> dict[str, Any]:
        """The steps not yet logged, as numbers of their own dtypes (one host sync), for a
        checkpoint between two log lines; {} when there are none."""
        if not self.pending:
            return {}
        window = jax.device_get(self.pending)
        return {"first_step": self.first_step,
                "dtypes": {k: np.asarray(v).dtype.name for k, v in window[0].items()},
                "steps": [{k: np.asarray(v).item() for k, v in m.items()} for m in window]}

    @classmethod
    def from_json(cls, every: int, saved: dict[str, Any]) -> "StepLog":
        """The log with the saved steps pending again, each metric in its own dtype, so their
        line averages the very numbers the uninterrupted run's did."""
        dtypes = saved["dtypes"]
        return cls(every, int(saved["first_step"]),
                   [{k: np.asarray(v, dtypes[k]) for k, v in m.items()} for m in saved["steps"]])


def patience(cfg: Config) -> int:
    """Early stopping's patience in epochs; 0 (off) waits longer than the run."""
    return cfg.train.early_stopping_patience or cfg.train.epochs + 1


def watched(val: dict[str, Any], monitor: str) -> float:
    """The plateau rule's input, a figure to minimize: the validation loss, or the error
    1 - accuracy (optax's rule is relative, so a negated accuracy would not do)."""
    return val["loss"] if monitor == "val_loss" else 1.0 - val["accuracy"]


def close_epoch(parts: RunParts, state: TrainState, loop: LoopState, val: dict[str, Any],
                epoch_steps: Sequence[tuple[float, float]]
                ) -> tuple[TrainState, LoopState, dict[str, Any]]:
    """The end of an epoch given its validation result: early stopping, the plateau rule and the
    epoch's metrics.jsonl record; `cnnjax train` and `cnnjax sweep` end each epoch (each
    member's) with it. Returns (state, loop, record); `loop.stopped_early` says if it ends."""
    cfg = parts.cfg
    monitor = cfg.train.monitor
    value = val["loss"] if monitor == "val_loss" else val["accuracy"]
    improved, bad, stop = loop.best.improves(value, patience(cfg), loop.bad_epochs)
    best = (dataclasses.replace(loop.best, value=value, epoch=loop.epoch, step=int(state.step))
            if improved else loop.best)
    train_loss, train_accuracy = np.mean(epoch_steps, axis=0)
    record = {"kind": "epoch", "epoch": loop.epoch, "step": int(state.step),
              "train_loss": float(train_loss), "train_accuracy": float(train_accuracy),
              "val_loss": val["loss"], "val_accuracy": val["accuracy"],
              # the rate of the epoch's last update
              "learning_rate": parts.learning_rate(int(state.step) - 1,
                                                   float(state.plateau_state.scale)),
              "improved": improved}
    state = state.replace(plateau_state=parts.update_plateau(state.plateau_state,
                                                             watched(val, monitor)))
    loop = loop.replace(epoch=loop.epoch + 1, batch=0, best=best, bad_epochs=bad,
                        stopped_early=stop, epoch_steps=())
    return state, loop, record


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What describes a run, built by `setup` and read by every stage, changed by none. The
    checkpointer is the run directory's writer, a resource the stages save through."""

    cfg: Config
    run_dir: pathlib.Path
    data: input_pipeline.Data | input_pipeline.Streamed  # in memory or read through grain
    parts: RunParts
    par: parallel.DataParallel
    resuming: bool
    eval_sizes: dict[str, int]
    ckpt: checkpoint.Checkpointer
    started: float  # time.perf_counter() at setup

    @property
    def steps_per_epoch(self) -> int:
        return self.parts.steps_per_epoch

    @property
    def train_key(self) -> jax.Array:
        return self.parts.train_key

    def evaluate(self, state: TrainState, split: str) -> dict[str, Any]:
        """Loss, accuracy, count and confusion matrix on 'val' or 'test' (one pass, one sync), of
        the parameters' EMA when `optim.ema_decay` keeps one."""
        if split not in self.eval_sizes:
            raise ValueError(f"split must be one of {sorted(self.eval_sizes)}, got {split!r}.")
        batches = self.data.eval_batches(split, self.eval_sizes[split], self.par.part)
        return self.parts.evaluate(state, _on_devices(self, batches))

    def images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        return self.data.images(split)

    def epochs(self, loop: LoopState) -> Iterator[int]:
        """The epochs left to train (none once early stopping has ended the run)."""
        if not loop.stopped_early:
            yield from range(loop.epoch, self.cfg.train.epochs + 1)

    def event(self, kind: type[Event], state: TrainState | None, loop: LoopState,
              control: Control, epoch: int | None = None, step: int | None = None,
              **fields) -> Event:
        """`step` defaults to the state's (a host sync); a sweep's stacked members pass theirs,
        with no state of their own between epochs (`state` None)."""
        return kind(step=int(state.step) if step is None else step,
                    epoch=loop.epoch if epoch is None else epoch,
                    state=state, control=control, best=loop.best, config=self.cfg,
                    run_dir=self.run_dir, is_primary=self.par.is_primary,
                    steps_per_epoch=self.steps_per_epoch, _run=self, **fields)


_DATA_POSITION = "data"  # the loop JSON's key for the data reader's position (streamed runs)


def _on_devices(run: RunSetup, batches) -> Iterator[dict[str, jax.Array]]:
    """Each process's rows of each batch, assembled into global arrays split over the mesh."""
    return map(run.par.shard_batch, batches)


def _hook(callbacks: CallbackList, hook: str, run: RunSetup, kind: type[Event],
          state: TrainState, loop: LoopState, **fields) -> None:
    """Calls `hook` of every callback with one event of `kind` for where the loop stands."""
    callbacks.call(hook, run.event(kind, state, loop, callbacks.control, **fields))


def _restore(run: RunSetup, step: int | None = None, *, resume: bool = False):
    """(state, saved loop state, step, seconds waited for a save in flight) of `step`, or of the
    newest intact checkpoint; to `resume` from it, the checkpoints after it are dropped."""
    waited = run.ckpt.wait()
    state, saved, step = run.ckpt.restore(run.parts.abstract, step=step)
    if resume:
        run.ckpt.discard_after(step)
    return state, saved, step, waited


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run ended with. `stopped_at_step` is set when a callback (or --stop-at-step, or a
    signal) stopped it: a later `train_and_evaluate` of the same directory continues. `summary` is
    summary.json's content on the process that writes the run directory, else None. `preempted`
    names the signal (SIGTERM, SIGINT) that arrived during the run, if one did: a caller that
    runs more work should stop and exit with `preempt.exit_status(preempted)`."""

    run_dir: pathlib.Path
    stopped_at_step: int | None = None
    stop_reason: str | None = None
    summary: dict[str, Any] | None = None
    preempted: str | None = None

    @property
    def finished(self) -> bool:
        return self.stopped_at_step is None


def setup(cfg: Config, run_dir: pathlib.Path | str | None = None
          ) -> tuple[RunSetup, TrainState, LoopState]:
    """Loads the data, builds the run's parts (`builder.build`: every user input is checked
    there), then creates the run directory (or opens it to resume) and the initial (or restored)
    train and loop states (`open_run`)."""
    started = time.perf_counter()
    tc = cfg.train
    data = input_pipeline.open_data(cfg.data, tc.seed)
    par = parallel.DataParallel.create()
    par.check_batch_size(tc.batch_size)
    if run_dir is None and jax.process_count() > 1:
        raise ValueError("a multi-process run needs an explicit --run-dir shared by every process.")
    parts = builder.build(cfg, data.spec,
                          input_pipeline.steps_per_epoch(data.size("train"), tc.batch_size),
                          devices=par.num_devices, sharding=par.replicated,
                          eval_rows=eval_sizes(par, data, tc.eval_batch_size)["val"])
    return open_run(parts, data, par, run_dir, started)


def eval_sizes(par: parallel.DataParallel, data: input_pipeline.Data | input_pipeline.Streamed,
               requested: int) -> dict[str, int]:
    """Each evaluation split's batch rows on these devices."""
    return {split: par.eval_batch_size(requested, data.size(split)) for split in ("val", "test")}


def open_run(parts: RunParts, data: input_pipeline.Data | input_pipeline.Streamed,
             par: parallel.DataParallel, run_dir: pathlib.Path | str | None = None,
             started: float | None = None, *, step: int | None = None, keep: int | None = None,
             announce: bool = True) -> tuple[RunSetup, TrainState, LoopState]:
    """Creates the run directory of `parts.cfg` (`run_dir`, or a new one under checkpoints/) or
    opens it to resume from its latest checkpoint, or from `step`, dropping the checkpoints after
    it; returns the run with its initial (or restored) train and loop states. `keep` overrides
    train.keep_checkpoints; `announce` prints the resume line."""
    run, state = _open(parts, data, par, run_dir, started, keep)
    return _resume(run, state, step, announce)


def _open(parts: RunParts, data: input_pipeline.Data | input_pipeline.Streamed,
          par: parallel.DataParallel, run_dir: pathlib.Path | str | None, started: float | None,
          keep: int | None) -> tuple[RunSetup, TrainState | None]:
    """The run, its directory open, and a new run's initial state (None when resuming)."""
    tc = parts.cfg.train
    opened = rundir.open_run_dir(run_dir, parts.cfg, par.is_primary, spec=data.spec,
                                 steps_per_epoch=parts.steps_per_epoch,
                                 initial_state=parts.init_state)
    run = RunSetup(cfg=parts.cfg, run_dir=opened.path, data=data, parts=parts, par=par,
                   resuming=opened.resuming, eval_sizes=eval_sizes(par, data, tc.eval_batch_size),
                   ckpt=checkpoint.Checkpointer(opened.path, keep or tc.keep_checkpoints,
                                                tc.async_checkpointing),
                   started=time.perf_counter() if started is None else started)
    return run, opened.state


def _resume(run: RunSetup, state: TrainState | None, step: int | None, announce: bool
            ) -> tuple[RunSetup, TrainState, LoopState]:
    """The loop state of a new run, or the state and loop state its checkpoint saved."""
    monitor = run.cfg.train.monitor
    loop = LoopState(best=dataclasses.replace(LoopState().best, monitor=monitor))
    if run.resuming:
        state, saved, step, _ = _restore(run, step, resume=True)
        loop = LoopState.from_json(saved, monitor)
        run.data.restore(saved.get(_DATA_POSITION))  # the streamed reader's place, where saved
        if run.par.is_primary and announce:
            print(f"resuming {run.run_dir} from step {step} (epoch {loop.epoch}, batch "
                  f"{loop.batch})")
    return run, state, loop.replace(last_checkpoint_step=int(state.step))


def start(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList) -> LoopState:
    """Hands the callbacks their saved state (when resuming) and calls `on_train_start`."""
    callbacks.load_state_dict(dict(loop.callbacks))
    _hook(callbacks, "on_train_start", run, Event, state, loop)
    return loop


def save(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList,
         best: dict[str, float] | None = None) -> LoopState:
    """Checkpoints the state with the loop state and the callbacks' state; the seconds the save
    waited for the previous one go to the next timing line."""
    loop = loop.replace(callbacks=callbacks.state_dict(), last_checkpoint_step=int(state.step))
    saved = loop.to_json()
    if (position := run.data.position()) is not None:  # a streamed run's grain iterator state
        saved[_DATA_POSITION] = position
    blocked = run.ckpt.save(int(state.step), state, saved, best)
    return loop.replace(timing=dataclasses.replace(
        loop.timing, unlogged_checkpoint_seconds=loop.timing.unlogged_checkpoint_seconds + blocked))


@dataclasses.dataclass
class EpochWindow:
    """An epoch in progress: its log window (`StepLog`) and where its timing began."""

    log: StepLog
    started: float  # time.perf_counter() when this process began the epoch's steps
    first_batch: int  # the batch it began at (a resumed run: not 0)


def open_epoch(run: RunSetup, loop: LoopState, step: int) -> tuple[EpochWindow, LoopState]:
    """The epoch's window from `loop.batch` on, `step` updates into the run, with the steps a
    checkpoint saved before their log line pending again."""
    every = run.cfg.train.log_every
    log = StepLog.from_json(every, loop.pending) if loop.pending else StepLog(every, step + 1)
    return EpochWindow(log, time.perf_counter(), loop.batch), loop.replace(pending={})


def epoch_batches(run: RunSetup, loop: LoopState) -> Iterator[dict[str, jax.Array]]:
    """The epoch's train batches from `loop.batch` on, placed on the run's devices."""
    tc = run.cfg.train
    return _on_devices(run, run.data.train_batches(tc.batch_size, tc.seed, loop.epoch, loop.batch,
                                                   run.par.part))


def first_step_timed(loop: LoopState, seconds: float) -> LoopState:
    """Records the run's first step's wall time (compile, mostly), once."""
    if loop.timing.first_step_s is not None:
        return loop
    return loop.replace(timing=dataclasses.replace(loop.timing, first_step_s=seconds))


def after_step(run: RunSetup, state: TrainState | None, loop: LoopState, callbacks: CallbackList,
               window: EpochWindow, metrics: dict[str, Any], *, step: int | None = None,
               signal: str | None = None) -> tuple[LoopState, bool]:
    """After a train step: the step hook, the log line when it is due (and the log hook), then
    whether to checkpoint here: at a log line before the epoch's end (whose checkpoint comes
    anyway) when a callback asked or stops the run, and at any step when `signal`
    (`preempt.requested()`) names one. Returns (loop, checkpoint here); `loop.stop_reason` set
    ends the epoch. Raises FloatingPointError at the log line of a non-finite step.

    `step` (the updates so far) defaults to the state's; `state` is None for a member of a
    stacked sweep (its hooks see none between epochs)."""
    control = callbacks.control
    loop = loop.replace(batch=loop.batch + 1)
    _hook(callbacks, "on_step", run, StepEvent, state, loop, step=step, metrics=metrics)
    logged = window.log.add(metrics) or loop.batch == run.steps_per_epoch
    if logged:
        record, steps = window.log.pull(loop.epoch)
        loop = loop.replace(epoch_steps=loop.epoch_steps + tuple(steps))
        _hook(callbacks, "on_log", run, LogEvent, state, loop, step=step, record=record)
    if signal:
        at = int(state.step) if step is None else step
        return loop.replace(stop_reason=f"stopped by {signal} at step {at}", preempted=signal), True
    if not logged or loop.batch == run.steps_per_epoch:
        return loop, False
    return (loop.replace(stop_reason=control.stop_reason),
            bool(control.checkpoint_requested or control.stop_reason))


def checkpoint_here(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList,
                    window: EpochWindow) -> LoopState:
    """A checkpoint within the epoch, the steps not yet logged saved with it."""
    loop = save(run, state, loop.replace(pending=window.log.to_json()), callbacks)
    callbacks.control.checkpoint_requested = False
    return loop.replace(pending={})


def end_train(run: RunSetup, loop: LoopState, window: EpochWindow) -> LoopState:
    """The epoch's training time and images/s (end_epoch adds the evaluation's time)."""
    seconds = time.perf_counter() - window.started
    images = (run.steps_per_epoch - window.first_batch) * run.cfg.train.batch_size
    return loop.replace(timing=dataclasses.replace(
        loop.timing, epoch_rates=loop.timing.epoch_rates + (images / seconds,),
        epoch_seconds=loop.timing.epoch_seconds + (seconds,)))


def train_epoch(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList
                ) -> tuple[TrainState, LoopState]:
    """The epoch's train steps (from where a resumed run left off), with the step and log hooks.

    A callback's stop ends it at the next log line, a signal (SIGTERM, Ctrl-C) at the next step,
    each after a checkpoint (`loop.stop_reason`). The state passed in is the caller's no more
    (the step donates it)."""
    train_step = run.parts.epoch_steps[loop.epoch - 1]
    window, loop = open_epoch(run, loop, int(state.step))
    for batch in epoch_batches(run, loop):
        t_step = time.perf_counter()
        state, metrics = train_step(state, batch, run.train_key)
        if loop.timing.first_step_s is None:
            jax.block_until_ready(state)
            loop = first_step_timed(loop, time.perf_counter() - t_step)
        loop, here = after_step(run, state, loop, callbacks, window, metrics,
                                signal=preempt.agreed())
        if here:
            loop = checkpoint_here(run, state, loop, callbacks, window)
        if loop.stop_reason:
            return state, loop
    return state, end_train(run, loop, window)


def end_epoch(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList
              ) -> tuple[TrainState, LoopState]:
    """Validation, early stopping, the plateau rule, the epoch hooks and a checkpoint; nothing
    when the epoch was stopped before its end (`loop.stop_reason`) or by a signal."""
    if loop.preempted or (loop.stop_reason and loop.batch < run.steps_per_epoch):
        return state, loop
    control, epoch = callbacks.control, loop.epoch
    t_eval = time.perf_counter()
    val = run.evaluate(state, "val")
    state, loop, record = close_epoch(run.parts, state, loop, val, loop.epoch_steps)
    timing = loop.timing
    train_seconds = timing.epoch_seconds[-1]
    seconds = train_seconds + time.perf_counter() - t_eval
    blocked = timing.unlogged_checkpoint_seconds
    timing = dataclasses.replace(timing, epoch_seconds=timing.epoch_seconds[:-1] + (seconds,),
                                 checkpoint_seconds=timing.checkpoint_seconds + blocked,
                                 unlogged_checkpoint_seconds=0.0)
    loop = loop.replace(timing=timing)
    line = {"epoch": epoch, "seconds": seconds, "train_seconds": train_seconds,
            "train_images_per_s": timing.epoch_rates[-1], "checkpoint_seconds": blocked}
    _hook(callbacks, "on_epoch_end", run, EpochEvent, state, loop, epoch=epoch, record=record,
          timing=line)
    best = {run.cfg.train.monitor: loop.best.value} if record["improved"] else None
    loop = save(run, state, loop, callbacks, best)
    control.checkpoint_requested = False  # asked at the epoch's last log line: this was it
    return state, loop.replace(stop_reason=control.stop_reason)


def finish(run: RunSetup, state: TrainState, loop: LoopState, callbacks: CallbackList) -> RunResult:
    """Ends the run. Stopped by a callback or a signal: a resumable result. Otherwise restores the
    best parameters, evaluates them on validation and test, lets the callbacks add to the summary,
    then writes the plots and, last, summary.json: a run directory with summary.json is complete."""
    if loop.preempted or (loop.stop_reason and not loop.stopped_early
                          and loop.epoch <= run.cfg.train.epochs):
        return RunResult(run.run_dir, int(state.step), loop.stop_reason, preempted=loop.preempted)
    tc = run.cfg.train
    best_state, _, _, waited = _restore(run, loop.best.step)
    val, test = run.evaluate(best_state, "val"), run.evaluate(best_state, "test")
    best_state = run.parts.evaluated(best_state)  # what the callbacks see: the evaluated parameters
    if not run.par.is_primary:
        return RunResult(run.run_dir)
    timing = loop.timing
    epoch_seconds = sum(timing.epoch_seconds)
    checkpoint_seconds = timing.checkpoint_seconds + timing.unlogged_checkpoint_seconds + waited
    summary = {
        "dataset": run.cfg.data.dataset, "seed": tc.seed, "num_params": run.parts.num_params,
        "monitor": tc.monitor, "best_epoch": loop.best.epoch, "best_step": loop.best.step,
        "epochs_run": loop.epoch - 1, "stopped_early": loop.stopped_early,
        "steps": int(state.step),
        "val": {"loss": val["loss"], "accuracy": val["accuracy"], "count": val["count"]},
        "test": test,
        "train_images_per_s": statistics.median(timing.epoch_rates[1:] or timing.epoch_rates),
        "first_step_s": timing.first_step_s, "wall_time_s": time.perf_counter() - run.started,
        "resumed": run.resuming, "devices": run.par.num_devices,
        "processes": jax.process_count(), "grad_passes_per_step": run.parts.passes,
        "conv_lowerings": run.parts.lowerings,
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoint_fraction_of_epoch_time": checkpoint_seconds / epoch_seconds if epoch_seconds else 0.0,
        "data": run.data.report(),
    }
    _hook(callbacks, "on_train_end", run, EndEvent, best_state, loop, summary=summary)
    plots.plot_run(run.run_dir, confusion=test["confusion"])
    logs.write_json(run.run_dir / "summary.json", summary)
    _close(run)
    return RunResult(run.run_dir, summary=summary)


def _close(run: RunSetup, failed: bool = False) -> None:
    """Stops the data's readers, waits for the last save and gives the run directory's lock back;
    after a failure already on its way to the caller, a failing last save is that failure again,
    not news."""
    try:
        try:
            run.data.close()
        finally:
            run.ckpt.close()
    except (OSError, ValueError):
        if not failed:
            raise
    finally:
        rundir.close_run_dir(run.run_dir)


def preempted_at_epoch_end(state: TrainState, loop: LoopState) -> LoopState:
    """A signal that came during the epoch's end stops the run there (its checkpoint is saved)."""
    signal = preempt.agreed()
    if not signal or loop.stop_reason:
        return loop
    return loop.replace(stop_reason=f"stopped by {signal} at step {int(state.step)}",
                        preempted=signal)


def train_and_evaluate(cfg: Config, run_dir: pathlib.Path | str | None = None, *,
                       callbacks: Sequence[Callback] = (), stop_at_step: int | None = None
                       ) -> RunResult:
    """Trains `cfg`'s model into `run_dir`, resuming from its latest checkpoint if it has one.

    Ends with the best-validation parameters evaluated on validation and test (summary.json).
    `callbacks` run after `default_callbacks(cfg, stop_at_step)`; with `stop_at_step`, or when a
    callback stops the run, it checkpoints and returns a stopped result: a later call continues.
    SIGTERM and Ctrl-C do the same at the next step (`RunResult.preempted` names the signal).
    """
    with preempt.handling():
        result = _train_and_evaluate(cfg, run_dir, callbacks, stop_at_step)
    return dataclasses.replace(result, preempted=result.preempted or preempt.requested())


def _train_and_evaluate(cfg: Config, run_dir: pathlib.Path | str | None,
                        callbacks: Sequence[Callback], stop_at_step: int | None) -> RunResult:
    hooks = CallbackList(default_callbacks(cfg, stop_at_step) + list(callbacks))
    run, state, loop = setup(cfg, run_dir)
    failed = True
    try:
        loop = start(run, state, loop, hooks)
        for _ in run.epochs(loop):
            state, loop = train_epoch(run, state, loop, hooks)
            state, loop = end_epoch(run, state, loop, hooks)
            loop = preempted_at_epoch_end(state, loop)
            if loop.stop_reason or loop.stopped_early:
                break
        result = finish(run, state, loop, hooks)
        failed = False
        return result
    except (FloatingPointError, CallbackError, input_pipeline.ReadError) as err:
        last = run.ckpt.last_good_step()
        where = (f"step {last} in {run.ckpt.directory}; resume with cnnjax train --resume "
                 f"{run.run_dir}" if last else "none yet")
        loss = f"train.loss {cfg.train.loss!r}: " if isinstance(err, NonFiniteLoss) else ""
        message = f"{loss}{err} Last good checkpoint: {where}."
        if isinstance(err, NonFiniteStep):
            raise type(err)(message, err.step) from err
        raise type(err)(message) from err
    except OSError as err:  # a full or read-only disk: one line, and what is safe
        raise checkpoint.disk_error(err, run.run_dir) or err
    finally:
        try:
            hooks.close()  # a log's last flush may fail as the disk did: that failure again
        except OSError:
            if not failed:
                raise
        finally:
            _close(run, failed)
