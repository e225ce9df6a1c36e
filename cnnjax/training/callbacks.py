"""Callbacks: what the loop calls at each step, log line, epoch end and at the end of training.

In the idiom of CLU's `periodic_actions` and Keras callbacks. A callback is any object with some of
the hooks below (subclass `Callback` and override what you need); it sees the state and metrics
and can ask the loop to checkpoint or to stop through `event.control`. The loop's own behaviours
(the metrics and timing logs, TensorBoard, the progress bar, mid-epoch checkpoints, --stop-at-step,
the augmentation grid, the dead-filter count) are callbacks too, built by `default_callbacks`.

A stop asked for at any hook takes effect at the next log line or epoch end, after a checkpoint:
a stopped run resumes exactly (`cnnjax train --resume DIR`). A callback that keeps state across
a resume returns it from `state_dict` (JSON) and gets it back in `load_state_dict`; it is saved in
every checkpoint under the callback's `name`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from cnnjax import imports
from cnnjax.report import logs, plots
from cnnjax.training.periodic import is_due


@dataclasses.dataclass
class Control:
    """What callbacks ask of the loop: a stop (with its reason) or a checkpoint. The loop reads
    the requests after each hook; a stop takes effect at the next log line or epoch end, after a
    checkpoint, and a checkpoint request at the next log line (an epoch's end saves anyway)."""

    stop_reason: str | None = None
    checkpoint_requested: bool = False

    def stop(self, reason: str = "a callback stopped the run") -> None:
        self.stop_reason = self.stop_reason or reason

    def checkpoint(self) -> None:
        self.checkpoint_requested = True


@dataclasses.dataclass(frozen=True)
class Event:
    """What every hook gets, and all a callback may use (the built-in ones included).

    `state` is the train state (immutable; the next step donates its arrays, so `jax.device_get`
    what you keep); `best` the best epoch so far (`loop_state.Best`); `key` a PRNG key of this
    callback's own, folded from the run's key and the callback's name (fold in `step` for a
    fresh draw each time)."""

    step: int
    epoch: int
    state: Any
    control: Control
    best: Any
    config: Any  # the run's Config
    run_dir: pathlib.Path
    is_primary: bool  # the process that writes logs, plots and summaries
    steps_per_epoch: int
    _run: Any = dataclasses.field(repr=False, compare=False, default=None)
    callback_name: str = ""

    def evaluate(self, split: str = "val", state: Any = None) -> dict[str, Any]:
        """Loss, accuracy, count and confusion matrix of `state` (default: the current one) on
        the 'val' or 'test' split; costs one pass over the split."""
        return self._run.evaluate(self.state if state is None else state, split)

    def images(self, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """The split's images (host units, read-only) and labels, as the run holds them."""
        return self._run.images(split)

    @property
    def model(self):
        """The run's Flax module (training and evaluation apply it to normalized images)."""
        return self._run.parts.model

    @property
    def spec(self):
        """The data's spec: image shape, classes, normalization."""
        return self._run.parts.spec

    @property
    def key(self) -> jax.Array:
        return jax.random.fold_in(self._run.train_key,
                                  zlib.crc32(self.callback_name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class StepEvent(Event):
    """After each train step. `metrics` are device arrays: reading one waits for the step."""

    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LogEvent(Event):
    """Every `train.log_every` steps and at an epoch's last step: `record` is the metrics.jsonl
    line (window means)."""

    record: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EpochEvent(Event):
    """At the end of an epoch, after evaluation, the plateau rule and early stopping.

    `record` is the epoch's metrics.jsonl line, `timing` its timing.jsonl line."""

    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    timing: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EndEvent(Event):
    """After the final evaluation, on the process that writes the run directory, before
    summary.json is written: a callback may add fields to `summary`. `state` holds the best
    parameters (their EMA, when the run keeps one)."""

    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


class CallbackError(imports.UserCodeError):
    """A callback raised: the run stops, resumable from its last checkpoint."""


class Callback:
    """Base class with every hook a no-op."""

    name: str | None = None  # key of the state saved with checkpoints (see `state_dict`)

    def on_train_start(self, event: Event) -> None: ...
    def on_step(self, event: StepEvent) -> None: ...
    def on_log(self, event: LogEvent) -> None: ...
    def on_epoch_end(self, event: EpochEvent) -> None: ...
    def on_train_end(self, event: EndEvent) -> None: ...
    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Periodic(Callback):
    """Calls `fn(event)` every N steps, every N epochs, at given steps and/or at the end, as
    CLU's `PeriodicCallback`. Step triggers fire after that step (`StepEvent`; step 0 before
    training starts), epoch triggers
    after the epoch's evaluation (`EpochEvent`), `at_end` with the best parameters (`EndEvent`).
    `fn` may return a value; they are kept in `results` as (step, value)."""

    def __init__(self, fn: Callable[[Event], Any], *, every_steps: int | None = None,
                 every_epochs: int | None = None, at_steps: Sequence[int] = (),
                 at_end: bool = False):
        for field, value in (("every_steps", every_steps), ("every_epochs", every_epochs)):
            if value is not None and value <= 0:
                raise ValueError(f"Periodic({field}={value}): give a positive count or None.")
        if not (every_steps or every_epochs or at_steps or at_end):
            raise ValueError("Periodic needs a trigger: every_steps, every_epochs, at_steps or at_end.")
        self.fn, self.every_steps, self.every_epochs = fn, every_steps, every_epochs
        self.at_steps, self.at_end = tuple(int(s) for s in at_steps), at_end
        self.results: list[tuple[int, Any]] = []

    def _call(self, event: Event) -> None:
        self.results.append((event.step, self.fn(event)))

    def on_train_start(self, event: Event) -> None:
        if event.step == 0 and 0 in self.at_steps:  # step 0: before the first step
            self._call(event)

    def on_step(self, event: StepEvent) -> None:
        if is_due(event.step, self.every_steps, self.at_steps):
            self._call(event)

    def on_epoch_end(self, event: EpochEvent) -> None:
        if is_due(event.record["epoch"], self.every_epochs):
            self._call(event)

    def on_train_end(self, event: EndEvent) -> None:
        if self.at_end:
            self._call(event)


class StopAtStep(Callback):
    """Stops (after a checkpoint) at the first log line or epoch end at or after `step`: for
    time-sliced jobs (`cnnjax train --stop-at-step N`)."""

    def __init__(self, step: int):
        if step <= 0:
            raise ValueError(f"--stop-at-step must be positive, got {step}.")
        self.at = step

    def on_log(self, event: LogEvent) -> None:
        if event.step >= self.at:
            event.control.stop(f"stopped at step {event.step} (--stop-at-step {self.at})")

    on_epoch_end = on_log


class CheckpointEvery(Callback):
    """Checkpoints mid-epoch at the first log line at or after each multiple of `every` steps
    (`train.checkpoint_every_steps`); every epoch end checkpoints anyway. The last log line's step
    is saved with each checkpoint, so a run resumed from one taken between log lines (after a
    signal) asks at the same lines."""

    name = "checkpoint_every"

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"train.checkpoint_every_steps must be >= 0, got {every}.")
        self.every, self.last, self._loaded = every, 0, False

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self._loaded = int(state["last"]), True

    def on_train_start(self, event: Event) -> None:
        if not self._loaded:
            self.last = event.step

    def on_log(self, event: LogEvent) -> None:
        if is_due(event.step, self.every, since=self.last):
            event.control.checkpoint()
        self.last = event.step


class JsonlLog(Callback):
    """Base of the JSON-lines logs: a resumed run keeps the lines written up to its checkpoint
    and drops the rest, so the log replays exactly. Only the primary process writes."""

    filename = ""

    def __init__(self):
        self.writer: logs.JsonlWriter | None = None
        self._keep = 0

    def state_dict(self) -> dict[str, Any]:
        return {"lines": self.writer.lines if self.writer else self._keep}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._keep = int(state["lines"])

    def on_train_start(self, event: Event) -> None:
        self.writer = logs.JsonlWriter(event.run_dir / self.filename, self._keep, event.is_primary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsLog(JsonlLog):
    """metrics.jsonl, the run's deterministic record: step windows and epoch lines."""

    name, filename = "metrics_log", "metrics.jsonl"

    def on_log(self, event: LogEvent) -> None:
        self.writer.write(event.record)

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.writer.write(event.record)


class TimingLog(JsonlLog):
    """timing.jsonl: the wall-clock figures, kept apart from the deterministic metrics."""

    name, filename = "timing_log", "timing.jsonl"

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.writer.write(event.timing)


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread re-raises a write the disk refused, which Python prints as a
    traceback; the writer hands the same error to the loop at its next event or flush, which
    reports it in one line. Installed once, around whatever hook was there."""
    previous = threading.excepthook
    if getattr(previous, "cnnjax_quiet", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread"
                and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.cnnjax_quiet = True
    threading.excepthook = hook


class TensorBoard(Callback):
    """TensorBoard event files in <run>/tensorboard (TensorBoard's own event writer; no
    TensorFlow): every number of metrics.jsonl as a scalar at its step, tagged `train/<name>` for
    step windows and `epoch/<name>` for epoch lines. A resumed run purges events after its
    checkpoint's step (a SessionLog START at that step, as torch's and tensorboardX's writers do).

    The writer is `tensorboard.summary.writer.EventFileWriter`, the one torch.utils.tensorboard
    wraps; tensorboardX's SummaryWriter would import torch (~2 s) for scalars alone."""

    name = "tensorboard"
    SKIP = {"kind", "epoch", "step"}

    def __init__(self, subdir: str = "tensorboard"):
        self.subdir, self.writer, self._purge = subdir, None, None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._purge = True

    def on_train_start(self, event: Event) -> None:
        if event.is_primary:
            from tensorboard.compat.proto.event_pb2 import Event as TbEvent, SessionLog
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            _quiet_writer_thread()
            self.writer = EventFileWriter(str(event.run_dir / self.subdir), flush_secs=30)
            if self._purge:
                now = time.time()
                self.writer.add_event(TbEvent(step=event.step + 1, wall_time=now,
                                              file_version="brain.Event:2"))
                self.writer.add_event(TbEvent(step=event.step + 1, wall_time=now,
                                              session_log=SessionLog(status=SessionLog.START)))

    def _scalars(self, prefix: str, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event as TbEvent
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=f"{prefix}/{key}", simple_value=float(value))
                  for key, value in record.items()
                  if key not in self.SKIP and isinstance(value, (int, float))]
        self.writer.add_event(TbEvent(step=int(record["step"]), wall_time=time.time(),
                                      summary=Summary(value=values)))

    def on_log(self, event: LogEvent) -> None:
        self._scalars("train", event.record)

    def on_epoch_end(self, event: EpochEvent) -> None:
        self._scalars("epoch", event.record)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class HParams(Callback):
    """TensorBoard's HParams tab: at the end of a run, the flattened config (`section.field`,
    `model.kwargs.*`) as the session's hyperparameters and the final figures (best epoch,
    validation and test loss and accuracy) as `hparams/<name>` scalars, in <run>/tensorboard
    beside the run's other scalars, so `tensorboard --logdir checkpoints/` compares runs there.

    The hparams plugin's protos are written directly with TensorBoard's `EventFileWriter`, as
    torch.utils.tensorboard's `add_hparams` does (the plugin's own summary modules import
    TensorFlow). No experiment summary is written: TensorBoard then takes the union of every
    run's hyperparameters (one run's experiment would hide keys only others set). Lists are
    written as JSON text, None is left out."""

    METRICS = {"best_epoch": ("best_epoch",), "val_loss": ("val", "loss"),
               "val_accuracy": ("val", "accuracy"), "test_loss": ("test", "loss"),
               "test_accuracy": ("test", "accuracy")}

    def __init__(self, subdir: str = "tensorboard"):
        self.subdir = subdir

    @staticmethod
    def values(config) -> dict[str, Any]:
        """The hyperparameters as TensorBoard takes them: bool, number or string."""
        from cnnjax.training.runset import flat_config

        return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                for k, v in flat_config(config).items() if v is not None}

    def on_train_end(self, event: EndEvent) -> None:
        from tensorboard.compat.proto.event_pb2 import Event as TbEvent
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2, api_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in self.values(event.config).items():
            if isinstance(value, bool):  # before int: a bool is an int to Python
                start.hparams[key].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[key].number_value = value
            else:
                start.hparams[key].string_value = value
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS"),
                                             end_time_secs=time.time())

        def plugin(tag, **data):
            meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
            return Summary.Value(tag=tag, metadata=meta, tensor=metadata.NULL_TENSOR)

        s = event.summary
        figures = []
        for name, path in self.METRICS.items():
            value = s
            for part in path:
                value = value[part]
            figures.append(Summary.Value(tag=f"hparams/{name}", simple_value=float(value)))
        _quiet_writer_thread()
        writer = EventFileWriter(str(event.run_dir / self.subdir), filename_suffix=".hparams")
        step, now = int(s["steps"]), time.time()
        writer.add_event(TbEvent(step=step, wall_time=now, summary=Summary(value=[
            plugin(metadata.SESSION_START_INFO_TAG, session_start_info=start)])))
        writer.add_event(TbEvent(step=step, wall_time=now, summary=Summary(value=figures)))
        writer.add_event(TbEvent(step=step, wall_time=now, summary=Summary(value=[
            plugin(metadata.SESSION_END_INFO_TAG, session_end_info=end)])))
        writer.flush()  # a write its thread could not make is raised here; close() would drop it
        writer.close()


class ProgressBar(Callback):
    """A tqdm bar over all steps of the run and one line per epoch (`train.progress`)."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, event: Event) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=event.config.train.epochs * event.steps_per_epoch, initial=event.step,
                        disable=not (event.config.train.progress and event.is_primary),
                        unit="step", dynamic_ncols=True)

    def on_step(self, event: StepEvent) -> None:
        self.bar.update(1)

    def on_log(self, event: LogEvent) -> None:
        r = event.record
        self.bar.set_postfix(epoch=r["epoch"], loss=f"{r['loss']:.4f}", acc=f"{r['accuracy']:.3f}")

    def on_epoch_end(self, event: EpochEvent) -> None:
        r, t = event.record, event.timing
        if not self.bar.disable:
            self.bar.write(f"epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f} acc "
                           f"{r['train_accuracy']:.4f}  val loss {r['val_loss']:.4f} acc "
                           f"{r['val_accuracy']:.4f}  lr {r['learning_rate']:.2e}  {t['seconds']:.1f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class AugmentationGrid(Callback):
    """augmentations.png: 16 training images over four augmented draws, at the start of a run."""

    name = "augmentation_grid"

    def on_train_start(self, event: Event) -> None:
        from cnnjax.data import augment

        augmenter = augment.from_config(event.config.augment)
        if not augmenter.transforms or event.step or not event.is_primary:
            return
        images = event.images("train")[0]
        sample = np.linspace(0, len(images) - 1, 16).astype(np.int32)
        plots.augmentation_grid(event.run_dir / "augmentations.png", augmenter, images[sample],
                                event.key, sample)


class DeadFilterCount(Callback):
    """summary.json's `dead_filters`: conv filters of the best parameters that never fire on the
    validation images (`cnnjax.nn.health`)."""

    def on_train_end(self, event: EndEvent) -> None:
        from cnnjax.nn.health import dead_filter_count

        variables = {"params": event.state.params, "batch_stats": event.state.batch_stats}
        event.summary["dead_filters"] = dead_filter_count(event.model, variables,
                                                          event.images("val")[0], event.spec)


def default_callbacks(cfg, stop_at_step: int | None = None, progress: bool = True
                      ) -> list[Callback]:
    """What `cnnjax train` runs with: the logs, TensorBoard, the progress bar (unless `progress`
    is False: a sweep's members, whose sweep prints one line per epoch), mid-epoch checkpoints,
    the augmentation grid, the dead-filter count, the HParams summary, and --stop-at-step if
    given."""
    callbacks = [MetricsLog(), TimingLog(), TensorBoard(), *([ProgressBar()] if progress else []),
                 CheckpointEvery(cfg.train.checkpoint_every_steps), AugmentationGrid(),
                 DeadFilterCount(), HParams()]
    if stop_at_step is not None:
        callbacks.append(StopAtStep(stop_at_step))
    return callbacks


def raise_callback_error(callback, hook: str, event: Event) -> None:
    """Raises the exception being handled as a CallbackError naming the callback, hook and step."""
    err = sys.exc_info()[1]
    raise CallbackError(f"callback {type(callback).__name__} failed in {hook} at step {event.step}: "
                        f"{imports.where(err)}{type(err).__name__}: {err}") from err


def _implements(callback, hook: str) -> bool:
    fn = getattr(callback, hook, None)
    return fn is not None and getattr(fn, "__func__", None) is not getattr(Callback, hook)


class CallbackList:
    """Calls each hook of every callback in order, on one shared `Control`."""

    HOOKS = ("on_train_start", "on_step", "on_log", "on_epoch_end", "on_train_end")

    def __init__(self, callbacks: Sequence[Any]):
        self.callbacks, self.control = list(callbacks), Control()
        names = [c.name for c in self.callbacks if getattr(c, "name", None)]
        if len(names) != len(set(names)):
            raise ValueError(f"two callbacks share a state name in {names}; give each its own "
                             f"`name`.")
        for c in self.callbacks:
            if not any(hasattr(c, h) for h in self.HOOKS):
                raise TypeError(f"{c!r} is not a callback: it has none of the hooks {self.HOOKS}.")
        # per hook, the callbacks that do something there (not `Callback`'s no-op): the loop
        # calls on_step every step, for every member of a sweep
        self._hooked = {hook: [c for c in self.callbacks if _implements(c, hook)]
                        for hook in self.HOOKS}

    def call(self, hook: str, event: Event) -> None:
        for c in self._hooked.get(hook, self.callbacks):
            fn = getattr(c, hook, None)
            if fn is None:
                continue
            try:
                fn(dataclasses.replace(event, callback_name=getattr(c, "name", None)
                                       or type(c).__name__))
            except (ValueError, OSError):  # a built-in's names the setting or file at fault
                if type(c).__module__.startswith("cnnjax."):
                    raise
                raise_callback_error(c, hook, event)
            except Exception:  # the callback's own failure, named as such
                raise_callback_error(c, hook, event)

    def state_dict(self) -> dict[str, Any]:
        """Each named callback's state, checked to be JSON before it goes into a checkpoint (a
        set or a numpy number would fail the save on orbax's thread, far from its callback)."""
        out = {}
        for c in self.callbacks:
            name = getattr(c, "name", None)
            if not (name and hasattr(c, "state_dict")):
                continue
            try:
                state = c.state_dict()
                json.dumps(state)
            except Exception as err:
                raise CallbackError(f"callback {type(c).__name__}: its state_dict() is not JSON, "
                                    f"so it cannot go into a checkpoint: {imports.where(err)}"
                                    f"{imports.first_line(err)}; return numbers, strings, lists "
                                    f"and dicts (float(x) for a numpy number).") from None
            if state is not None:
                out[name] = state
        return out

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for c in self.callbacks:
            name = getattr(c, "name", None)
            if name in states and hasattr(c, "load_state_dict"):
                try:
                    c.load_state_dict(states[name])
                except Exception as err:
                    raise CallbackError(f"callback {type(c).__name__} failed in load_state_dict "
                                        f"(the state its checkpoint saved): {imports.where(err)}"
                                        f"{imports.first_line(err)}") from err

    def close(self) -> None:
        for c in self.callbacks:
            if hasattr(c, "close"):
                c.close()

