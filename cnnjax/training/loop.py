"""The training loop as four stages a script can call, in the order one batch goes through them:

    run, state = setup(cfg, run_dir)              # data, model, state, run directory, resume
    for epoch in run.epochs():
        state, stop = train_epoch(run, state, epoch, callbacks)   # the epoch's steps
        state, stop = end_epoch(run, state, epoch, callbacks)     # eval, plateau, early stop, ckpt
    result = finish(run, state, callbacks)        # best parameters, test, summary.json

`train_and_evaluate(cfg, run_dir, callbacks=[...])` is exactly that, with `default_callbacks`
(logs, TensorBoard, progress bar, checkpoints, ...) before the caller's own. Every check that can
fail on the user's input runs in `setup`, before anything is compiled.

Resume is exact: a checkpoint holds the train state and the loop's `Progress` (epoch, batch within
it, early-stopping state, the callbacks' state); batch order is a function of (seed, epoch) and
every random draw of (key, step, example), so a resumed run writes the same metrics.jsonl, byte
for byte, as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax.training.early_stopping import EarlyStopping

from cnnjax.config import Config, TrainConfig
from cnnjax.data import augment, input_pipeline
from cnnjax.nn.conv import conv_lowerings
from cnnjax.nn.models import build_model, check_model, count_params, has_batch_stats
from cnnjax.report import logs, plots
from cnnjax.training import checkpoint, parallel, rundir, transfer
from cnnjax.training.callbacks import (Callback, CallbackList, EndEvent, EpochEvent, Event,
                                       LogEvent, StepEvent, default_callbacks)
from cnnjax.training.optim import ema_params, learning_rate_at, make_plateau, plateau_step
from cnnjax.training.steps import (StepOptions, TrainState, create_train_state, eval_pass_rows,
                                   evaluate, grad_passes, make_eval_step, make_train_step)


@dataclasses.dataclass
class Progress:
    """Where the loop stands, saved as JSON with every checkpoint."""

    epoch: int = 1  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained
    best_epoch: int = 0
    best_step: int = 0
    best_val_loss: float | None = None  # None until the first evaluation
    patience_count: int = 0
    epoch_steps: list = dataclasses.field(default_factory=list)  # [loss, accuracy] so far this epoch
    epoch_rates: list = dataclasses.field(default_factory=list)
    epoch_seconds: list = dataclasses.field(default_factory=list)
    checkpoint_seconds: float = 0.0  # blocked on saves, as counted in the epochs' timing lines
    first_step_s: float | None = None
    stopped_early: bool = False
    last_checkpoint_step: int = 0
    root_key: list = dataclasses.field(default_factory=list)  # jax.random.key_data of the run key
    callbacks: dict = dataclasses.field(default_factory=dict)  # each callback's state_dict()


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run with this seed."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    return init_rng, train_rng


class StepLog:
    """Collects per-step metrics on device and pulls them to the host once per `every` steps.

    Pulled [loss, accuracy] pairs go to `epoch_steps` (a list the caller may own, such as the
    saved `Progress.epoch_steps`) until `epoch_means` empties it."""

    def __init__(self, every: int, epoch_steps: list | None = None):
        if every <= 0:
            raise ValueError(f"train.log_every must be positive, got {every}.")
        self.every = every
        self.first_step = 1  # the step number of the first pending metrics; see `start`
        self.pending: list[dict] = []
        self.epoch_steps = [] if epoch_steps is None else epoch_steps

    def add(self, metrics: dict) -> bool:
        self.pending.append(metrics)
        return len(self.pending) >= self.every

    def start(self, first_step: int) -> None:
        """The next metrics added are those of step `first_step` (at each epoch's start)."""
        self.first_step = first_step

    def pull(self, epoch: int) -> dict[str, Any] | None:
        """Window means as one deterministic record; raises on the first non-finite step."""
        if not self.pending:
            return None
        window = jax.device_get(self.pending)  # one host-device sync for the whole window
        self.pending = []
        for i, m in enumerate(window):
            if not m["finite"]:
                raise FloatingPointError(
                    f"non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) "
                    f"at step {self.first_step + i} (epoch {epoch}); the update was not applied. "
                    f"Lower optim.learning_rate or check the data.")
        self.epoch_steps += [[float(m["loss"]), float(m["accuracy"])] for m in window]
        keys = [k for k in window[0] if k != "finite"]
        record = {k: float(np.mean([m[k] for m in window])) for k in keys}
        last = self.first_step + len(window) - 1
        self.first_step = last + 1
        return {"kind": "step", "epoch": epoch, "step": last, **record}

    def epoch_means(self) -> tuple[float, float]:
        """Mean train loss and accuracy over every step pulled since the last call."""
        loss, acc = np.mean(self.epoch_steps, axis=0)
        del self.epoch_steps[:]
        return float(loss), float(acc)


def check_lengths(tc: TrainConfig) -> None:
    """train.epochs and train.log_every, checked before anything is built (train and sweep)."""
    for key in ("epochs", "log_every"):
        if getattr(tc, key) <= 0:
            raise ValueError(f"train.{key} must be positive, got {getattr(tc, key)}.")


def patience(tc: TrainConfig) -> int:
    """Early stopping's patience in epochs; 0 (off) waits longer than the run."""
    return tc.early_stopping_patience or tc.epochs + 1


@dataclasses.dataclass
class EarlyStop:
    """The best epoch so far and the patience count: what the end of an epoch updates."""

    best_epoch: int = 0
    best_step: int = 0
    best_val_loss: float | None = None
    patience_count: int = 0

    def flax(self, patience: int) -> EarlyStopping:
        best = float("inf") if self.best_val_loss is None else self.best_val_loss
        return EarlyStopping(patience=patience, best_metric=best, patience_count=self.patience_count)


def watched(val: dict[str, Any], monitor: str = "val_loss") -> float:
    """The figure `train.monitor` names, as one to minimize: the validation loss, or the
    validation error 1 - accuracy (optax's plateau rule and flax's early stopping minimize)."""
    return val["loss"] if monitor == "val_loss" else 1.0 - val["accuracy"]


def close_epoch(state: TrainState, plateau, early: EarlyStop, patience: int, epoch: int,
                val: dict[str, Any], train_means: tuple[float, float], learning_rate: float,
                monitor: str = "val_loss") -> tuple[TrainState, dict[str, Any], bool]:
    """The end of an epoch given its validation result: early stopping (updates `early`), the
    plateau rule (the returned state) and the epoch's metrics.jsonl record; `cnnjax train` and
    `cnnjax sweep` both end each epoch (each seed's) with it. Returns (state, record, stop)."""
    value = watched(val, monitor)
    rule = early.flax(patience).update(value)
    if rule.has_improved:
        early.best_epoch, early.best_step = epoch, int(state.step)
    early.best_val_loss, early.patience_count = float(rule.best_metric), rule.patience_count
    record = {"kind": "epoch", "epoch": epoch, "step": int(state.step),
              "train_loss": train_means[0], "train_accuracy": train_means[1],
              "val_loss": val["loss"], "val_accuracy": val["accuracy"],
              "learning_rate": learning_rate, "improved": bool(rule.has_improved)}
    state = state.replace(plateau_state=plateau_step(plateau, state.plateau_state, value))
    return state, record, bool(rule.should_stop)


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What `setup` built for a run: read by every later stage, changed by none (the
    checkpointer and the progress record are the two mutable parts, and say so)."""

    cfg: Config
    run_dir: pathlib.Path
    data: input_pipeline.Data
    model: Any
    tx: Any
    plateau: Any
    augmenter: augment.Compose
    par: parallel.DataParallel
    grad_passes: int
    steps_per_epoch: int
    resuming: bool
    train_rng: jax.Array
    train_steps: transfer.EpochSteps  # the compiled train step of each epoch
    eval_step: Callable
    eval_sizes: dict[str, int]
    ckpt: checkpoint.Checkpointer  # mutable: saves
    progress: Progress  # mutable: the loop's position, saved with every checkpoint
    started: float  # time.perf_counter() at setup
    blocked_logged: list = dataclasses.field(default_factory=lambda: [0.0])  # mutable: save time
    # already counted in a timing line, of this process's checkpointer

    def evaluate(self, state: TrainState, split: str) -> dict[str, Any]:
        """Loss, accuracy, count and confusion matrix on 'val' or 'test' (one pass, one sync), of
        the parameters' EMA when `optim.ema_decay` keeps one."""
        if split not in self.eval_sizes:
            raise ValueError(f"split must be one of {sorted(self.eval_sizes)}, got {split!r}.")
        batches = input_pipeline.eval_batches(*getattr(self.data, split), self.eval_sizes[split],
                                              self.par.part)
        return evaluate(self.eval_step, evaluated_state(state), map(self.par.shard_batch, batches))

    def epochs(self) -> Iterator[int]:
        """The epochs left to train (none once early stopping has ended the run)."""
        if not self.progress.stopped_early:
            yield from range(self.progress.epoch, self.cfg.train.epochs + 1)

    def learning_rate(self, state: TrainState) -> float:
        """The rate of the update from `state` (the schedule's, times the plateau rule's scale)."""
        return learning_rate_at(self.cfg.optim, int(state.step), float(state.plateau_state.scale),
                                self.steps_per_epoch, self.cfg.train.epochs)

    def patience(self) -> int:
        return patience(self.cfg.train)


def evaluated_state(state: TrainState) -> TrainState:
    """The state evaluation and the best checkpoint's metrics use: with `optim.ema_decay`, the
    EMA of the parameters (batch-norm statistics stay the live ones)."""
    ema = ema_params(state.opt_state, state.params) if state.opt_state is not None else None
    return state if ema is None else state.replace(params=ema)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run ended with. `stopped_at_step` is set when a callback (or --stop-at-step)
    stopped it: a later `train_and_evaluate` of the same directory continues. `summary` is
    summary.json's content on the process that writes the run directory, else None."""

    run_dir: pathlib.Path
    stopped_at_step: int | None = None
    stop_reason: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.stopped_at_step is None


def setup(cfg: Config, run_dir: pathlib.Path | str | None = None) -> tuple[RunSetup, TrainState]:
    """Loads the data, builds the model, optimizer and compiled steps, checks every user input,
    then creates the run directory (or opens it to resume) and the initial (or restored) state."""
    started = time.perf_counter()
    tc = cfg.train
    data = input_pipeline.load_data(cfg.data, tc.seed)
    model = build_model(cfg.model, data.spec.num_classes)
    check_model(model, data.spec.image_shape, data.spec.num_classes, cfg.model.name)
    options = StepOptions.from_config(cfg, data.spec.num_classes)
    n_steps = input_pipeline.steps_per_epoch(len(data.train[1]), tc.batch_size)
    check_lengths(tc)
    if tc.checkpoint_every_steps < 0:
        raise ValueError(f"train.checkpoint_every_steps must be >= 0, got {tc.checkpoint_every_steps}.")
    tx, plateau = transfer.make_transfer_optimizer(cfg, n_steps), make_plateau(cfg.optim)
    augmenter = augment.from_config(cfg.augment)
    par = parallel.DataParallel.create()
    par.check_batch_size(tc.batch_size)
    passes = grad_passes(tc.batch_size // par.num_devices, tc.microbatch,
                         has_batch_stats(model, data.spec.image_shape))
    if run_dir is None and jax.process_count() > 1:
        raise ValueError("a multi-process run needs an explicit --run-dir shared by every process.")
    run_dir = pathlib.Path(run_dir if run_dir is not None else rundir.default_run_dir(cfg))

    init_rng, train_rng = seed_keys(tc.seed)
    state = jax.jit(lambda rng: create_train_state(model, tx, plateau, data.spec.image_shape, rng),
                    out_shardings=par.replicated)(init_rng)
    del init_rng
    if not rundir.has_checkpoint(run_dir):
        # a new run: transfer.backbone is read (and refused) before the run directory exists
        state = jax.device_put(transfer.initialize(state, cfg), par.replicated)
    resuming = rundir.open_run_dir(run_dir, cfg, par.is_primary)
    if par.is_primary and not resuming:
        rundir.write_data_spec(run_dir, data.spec, n_steps)
    ckpt = checkpoint.Checkpointer(run_dir, tc.keep_checkpoints, tc.async_checkpointing)
    progress = Progress(root_key=jax.random.key_data(train_rng).tolist())
    if resuming:
        state, loop, step = ckpt.restore(par.abstract(state))
        progress = Progress(**loop)
        train_rng = jax.random.wrap_key_data(np.asarray(progress.root_key, np.uint32))
        if par.is_primary:
            print(f"resuming {run_dir} from step {step} (epoch {progress.epoch}, batch {progress.batch})")
    progress.last_checkpoint_step = int(state.step)
    # One compiled step per set of frozen layers (transfer learning): a recompile at unfreezing only.
    train_steps = transfer.EpochSteps(model, cfg.transfer, lambda m: make_train_step(
        m, tx, data.spec.mean, data.spec.std, augmenter, tc.microbatch, options=options))
    eval_step = make_eval_step(model, data.spec.mean, data.spec.std, data.spec.num_classes,
                               options=options)
    eval_sizes = {split: par.eval_batch_size(tc.eval_batch_size, len(getattr(data, split)[1]))
                  for split in ("val", "test")}
    run = RunSetup(cfg=cfg, run_dir=run_dir, data=data, model=model, tx=tx, plateau=plateau,
                   augmenter=augmenter, par=par, grad_passes=passes, steps_per_epoch=n_steps,
                   resuming=resuming, train_rng=train_rng, train_steps=train_steps,
                   eval_step=eval_step, eval_sizes=eval_sizes, ckpt=ckpt, progress=progress,
                   started=started)
    return run, state


def start(run: RunSetup, state: TrainState, callbacks: CallbackList) -> None:
    """Hands the callbacks their saved state (when resuming) and calls `on_train_start`."""
    callbacks.load_state_dict(run.progress.callbacks)
    callbacks.call("on_train_start", Event(run, run.progress, state, callbacks.control))


def save(run: RunSetup, state: TrainState, callbacks: CallbackList,
         val_loss: float | None = None) -> None:
    """Checkpoints the state with the loop's position and the callbacks' state."""
    progress = run.progress
    progress.callbacks = callbacks.state_dict()
    progress.last_checkpoint_step = int(state.step)
    run.ckpt.save(int(state.step), state, dataclasses.asdict(progress), val_loss)


def train_epoch(run: RunSetup, state: TrainState, epoch: int, callbacks: CallbackList
                ) -> tuple[TrainState, bool]:
    """The epoch's train steps (from where a resumed run left off), with the step and log hooks.

    Returns (state, stopped): stopped when a callback asked to stop, at a log line, after a
    checkpoint. The state is the caller's no more (the step donates it)."""
    progress, control, tc = run.progress, callbacks.control, run.cfg.train
    train_step = run.train_steps(state, epoch)
    t_epoch, first_batch = time.perf_counter(), progress.batch
    step_log = StepLog(tc.log_every, progress.epoch_steps)
    step_log.start(int(state.step) + 1)
    for batch in input_pipeline.train_batches(*run.data.train, tc.batch_size, tc.seed, epoch,
                                              first_batch, run.par.part):
        t_step = time.perf_counter()
        state, metrics = train_step(state, run.par.shard_batch(batch), run.train_rng)
        if progress.first_step_s is None:
            jax.block_until_ready(state)
            progress.first_step_s = time.perf_counter() - t_step
        progress.batch += 1
        callbacks.call("on_step", StepEvent(run, progress, state, control, metrics))
        if not step_log.add(metrics):
            continue
        record = step_log.pull(epoch)
        callbacks.call("on_log", LogEvent(run, progress, state, control, record))
        if progress.batch < run.steps_per_epoch:  # the epoch's end checkpoints anyway
            if control.checkpoint_requested or control.stop_reason:
                save(run, state, callbacks)
                control.checkpoint_requested = False
            if control.stop_reason:
                return state, True
    record = step_log.pull(epoch)  # syncs: the epoch's steps are done
    if record is not None:
        callbacks.call("on_log", LogEvent(run, progress, state, control, record))
    train_seconds = time.perf_counter() - t_epoch
    progress.epoch_rates.append((run.steps_per_epoch - first_batch) * tc.batch_size / train_seconds)
    progress.epoch_seconds.append(train_seconds)  # end_epoch adds the evaluation's time
    return state, False


def end_epoch(run: RunSetup, state: TrainState, epoch: int, callbacks: CallbackList
              ) -> tuple[TrainState, bool]:
    """Validation, early stopping, the plateau rule, the epoch hooks and a checkpoint.

    Returns (state, stop): stop when early stopping ends the run or a callback asked to stop."""
    progress, control = run.progress, callbacks.control
    t_eval = time.perf_counter()
    lr = run.learning_rate(state.replace(step=state.step - 1))  # the epoch's last update's
    val = run.evaluate(state, "val")
    train_means = StepLog(1, progress.epoch_steps).epoch_means()
    early = EarlyStop(progress.best_epoch, progress.best_step, progress.best_val_loss,
                      progress.patience_count)
    state, record, stop_early = close_epoch(state, run.plateau, early, run.patience(), epoch, val,
                                            train_means, lr, run.cfg.train.monitor)
    progress.best_epoch, progress.best_step = early.best_epoch, early.best_step
    progress.best_val_loss, progress.patience_count = early.best_val_loss, early.patience_count
    train_seconds = progress.epoch_seconds[-1]
    progress.epoch_seconds[-1] += time.perf_counter() - t_eval
    blocked = run.ckpt.seconds_blocked - run.blocked_logged[0]
    run.blocked_logged[0] = run.ckpt.seconds_blocked
    timing = {"epoch": epoch, "seconds": progress.epoch_seconds[-1], "train_seconds": train_seconds,
              "train_images_per_s": progress.epoch_rates[-1], "checkpoint_seconds": blocked}
    progress.checkpoint_seconds += blocked
    callbacks.call("on_epoch_end", EpochEvent(run, progress, state, control, record, timing))
    progress.epoch, progress.batch = epoch + 1, 0
    progress.stopped_early = stop_early
    save(run, state, callbacks, watched(val, run.cfg.train.monitor) if record["improved"] else None)
    control.checkpoint_requested = False  # asked at the epoch's last log line: this was it
    return state, stop_early or bool(control.stop_reason)


def _conv_lowerings(run: RunSetup) -> dict[str, dict[str, str]]:
    """Each conv's lowering per pass (`cnnjax.nn.conv`), chosen from the rows a conv sees (a
    pass's global rows under jit over the mesh): training at one train pass's, inference at one
    validation pass's."""
    n = run.par.num_devices
    train = conv_lowerings(run.model, run.data.spec.image_shape,
                           max(1, run.cfg.train.batch_size // run.grad_passes))
    infer = conv_lowerings(run.model, run.data.spec.image_shape,
                           eval_pass_rows(run.eval_sizes["val"] // n) * n)
    return {name: {**passes, "inference": infer[name]["inference"]} for name, passes in train.items()}


def finish(run: RunSetup, state: TrainState, callbacks: CallbackList) -> RunResult:
    """Restores the best-validation parameters, evaluates them on validation and test, lets the
    callbacks add to the summary, then writes the plots and, last, summary.json: a run directory
    with summary.json is complete."""
    progress, tc = run.progress, run.cfg.train
    run.ckpt.close()  # waits for the last save
    blocked_after_log = run.ckpt.seconds_blocked - run.blocked_logged[0]
    ckpt = checkpoint.Checkpointer(run.run_dir, tc.keep_checkpoints, read_only=True)
    best_state, _, _ = ckpt.restore(run.par.abstract(state), step=progress.best_step)
    val, test = run.evaluate(best_state, "val"), run.evaluate(best_state, "test")
    best_state = evaluated_state(best_state)  # what the callbacks see: the evaluated parameters
    if not run.par.is_primary:
        return RunResult(run.run_dir)
    epoch_seconds = sum(progress.epoch_seconds)
    checkpoint_seconds = progress.checkpoint_seconds + blocked_after_log
    summary = {
        "dataset": run.cfg.data.dataset, "seed": tc.seed,
        "num_params": count_params(best_state.params),
        "best_epoch": progress.best_epoch, "best_step": progress.best_step,
        "epochs_run": progress.epoch - 1, "stopped_early": progress.stopped_early,
        "steps": int(state.step),
        "val": {"loss": val["loss"], "accuracy": val["accuracy"], "count": val["count"]},
        "test": test,
        "train_images_per_s": statistics.median(progress.epoch_rates[1:] or progress.epoch_rates),
        "first_step_s": progress.first_step_s, "wall_time_s": time.perf_counter() - run.started,
        "resumed": run.resuming, "devices": run.par.num_devices,
        "processes": jax.process_count(), "grad_passes_per_step": run.grad_passes,
        "conv_lowerings": _conv_lowerings(run),
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoint_fraction_of_epoch_time": checkpoint_seconds / epoch_seconds if epoch_seconds else 0.0,
    }
    callbacks.call("on_train_end", EndEvent(run, progress, best_state, callbacks.control, summary))
    plots.plot_run(run.run_dir, confusion=test["confusion"])
    logs.write_json(run.run_dir / "summary.json", summary)
    rundir.close_run_dir(run.run_dir)
    return RunResult(run.run_dir, summary=summary)


def train_and_evaluate(cfg: Config, run_dir: pathlib.Path | str | None = None, *,
                       callbacks: Sequence[Callback] = (), stop_at_step: int | None = None
                       ) -> RunResult:
    """Trains `cfg`'s model into `run_dir`, resuming from its latest checkpoint if it has one.

    Ends with the best-validation parameters evaluated on validation and test (summary.json).
    `callbacks` run after `default_callbacks(cfg, stop_at_step)`; with `stop_at_step`, or when a
    callback stops the run, it checkpoints and returns a stopped result: a later call continues.
    """
    hooks = CallbackList(default_callbacks(cfg, stop_at_step) + list(callbacks))
    run, state = setup(cfg, run_dir)
    try:
        start(run, state, hooks)
        for epoch in run.epochs():
            state, stopped = train_epoch(run, state, epoch, hooks)
            if not stopped:
                state, stopped = end_epoch(run, state, epoch, hooks)
            if run.progress.stopped_early:
                break
            if stopped:
                return RunResult(run.run_dir, int(state.step), hooks.control.stop_reason)
        return finish(run, state, hooks)
    except FloatingPointError as err:
        run.ckpt.wait()
        steps = run.ckpt.steps()
        raise FloatingPointError(f"{err} Last good checkpoint: "
                                 f"{f'step {steps[-1]} in {run.ckpt.directory}' if steps else 'none yet'}."
                                 ) from err
    finally:
        hooks.close()
        run.ckpt.close()
        rundir.close_run_dir(run.run_dir)
