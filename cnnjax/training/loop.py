"""The training loop: data -> model -> compiled steps -> plateau rule and early stopping ->
checkpoints -> run directory.

`train_and_evaluate(config, run_dir)` is the whole job; the CLI and experiment scripts call it.
Every check that can fail on the user's input (dataset, geometry, batch size, run directory, a
resumed run's config) runs before anything is compiled.

Resume is exact: a checkpoint holds the train state and the loop's `Progress` (epoch, batch within
it, early-stopping state, log line counts); batch order is a function of (seed, epoch) and every
random draw of (key, step, example), so a resumed run writes the same metrics.jsonl, byte for
byte, as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax.training.early_stopping import EarlyStopping
from tqdm.auto import tqdm

from cnnjax.data import augment, input_pipeline
from cnnjax.training import checkpoint, parallel, rundir, transfer
from cnnjax.report import logs as report, plots
from cnnjax.config import Config
from cnnjax.nn.models import build_model, check_geometry, count_params, has_batch_stats
from cnnjax.training.optim import make_plateau, plateau_step
from cnnjax.nn.health import dead_filter_count
from cnnjax.training.steps import (AUGMENT_STREAM, create_train_state, evaluate, grad_passes, make_eval_step,
                          make_train_step)

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
    metrics_lines: int = 0
    timing_lines: int = 0
    epoch_rates: list = dataclasses.field(default_factory=list)
    first_step_s: float | None = None
    stopped_early: bool = False
    root_key: list = dataclasses.field(default_factory=list)  # jax.random.key_data of the run key

    def early_stopping(self, patience: int) -> EarlyStopping:
        best = float("inf") if self.best_val_loss is None else self.best_val_loss
        return EarlyStopping(patience=patience, best_metric=best, patience_count=self.patience_count)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run with this seed."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    return init_rng, train_rng


class StepLog:
    """Collects per-step metrics on device and pulls them to the host once per `every` steps."""

    def __init__(self, every: int):
        if every <= 0:
            raise ValueError(f"train.log_every must be positive, got {every}.")
        self.every = every
        self.first_step = 1  # the step number of the first pending metrics; see `start`
        self.pending: list[dict] = []
        self.epoch_steps: list[list[float]] = []  # [loss, accuracy] of each pulled step this epoch

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
        self.epoch_steps = []
        return float(loss), float(acc)


def train_and_evaluate(cfg: Config, run_dir: pathlib.Path | str | None = None, *,
                       stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `cfg`'s model into `run_dir`, resuming from its latest checkpoint if it has one.

    Ends with the best-validation parameters evaluated on validation and test, and returns the run
    summary (also saved as summary.json). With `stop_at_step`, training stops at the first log line
    at or after that step, checkpoints and returns {'stopped_at_step': ...}: a later call continues.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    data = input_pipeline.load_data(cfg.data, tc.seed)
    model = build_model(cfg.model, data.spec.num_classes)
    check_geometry(model, data.spec.image_shape)
    train_images, train_labels = data.train
    n_steps = input_pipeline.steps_per_epoch(len(train_labels), tc.batch_size)
    for key in ("epochs", "log_every"):
        if getattr(tc, key) <= 0:
            raise ValueError(f"train.{key} must be positive, got {getattr(tc, key)}.")
    if tc.checkpoint_every_steps < 0:
        raise ValueError(f"train.checkpoint_every_steps must be >= 0, got {tc.checkpoint_every_steps}.")
    tx, plateau = transfer.make_transfer_optimizer(cfg, n_steps), make_plateau(cfg.optim)
    augmenter = augment.from_config(cfg.augment)
    par = parallel.DataParallel.create()
    par.check_batch_size(tc.batch_size)
    passes = grad_passes(tc.batch_size // par.num_devices, tc.microbatch,
                         has_batch_stats(model, data.spec.image_shape))
    primary = par.is_primary
    if run_dir is None and jax.process_count() > 1:
        raise ValueError("a multi-process run needs an explicit --run-dir shared by every process.")
    run_dir = pathlib.Path(run_dir if run_dir is not None else rundir.default_run_dir(cfg))
    resuming = rundir.open_run_dir(run_dir, cfg, primary)
    ckpt = checkpoint.Checkpointer(run_dir, tc.keep_checkpoints, tc.async_checkpointing)

    init_rng, train_rng = seed_keys(tc.seed)
    state = jax.jit(lambda rng: create_train_state(model, tx, plateau, data.spec.image_shape, rng),
                    out_shardings=par.replicated)(init_rng)
    del init_rng
    if not resuming:
        state = jax.device_put(transfer.initialize(state, cfg), par.replicated)
    progress = Progress(root_key=jax.random.key_data(train_rng).tolist())
    if resuming:
        state, loop, step = ckpt.restore(par.abstract(state))
        progress = Progress(**loop)
        train_rng = jax.random.wrap_key_data(np.asarray(progress.root_key, np.uint32))
        if primary:
            print(f"resuming {run_dir} from step {step} (epoch {progress.epoch}, batch {progress.batch})")
    # One compiled step per set of frozen layers (transfer learning): a recompile at unfreezing only.
    epoch_steps = transfer.EpochSteps(model, cfg.transfer, lambda m: make_train_step(
        m, tx, data.spec.mean, data.spec.std, augmenter, tc.microbatch))
    eval_step = make_eval_step(model, data.spec.mean, data.spec.std, data.spec.num_classes)
    if augmenter.transforms and not resuming and primary:
        sample = np.linspace(0, len(train_labels) - 1, 16).astype(np.int32)
        plots.augmentation_grid(run_dir / "augmentations.png", augmenter, train_images[sample],
                                 jax.random.fold_in(jax.random.fold_in(train_rng, 0), AUGMENT_STREAM),
                                 sample)
    metrics_log = report.JsonlWriter(run_dir / "metrics.jsonl", progress.metrics_lines, primary)
    timing_log = report.JsonlWriter(run_dir / "timing.jsonl", progress.timing_lines, primary)
    eval_size = {split: par.eval_batch_size(tc.eval_batch_size, len(getattr(data, split)[1]))
                 for split in ("val", "test")}

    def eval_split(state, split: str) -> dict[str, Any]:
        batches = input_pipeline.eval_batches(*getattr(data, split), eval_size[split], par.part)
        return evaluate(eval_step, state, map(par.shard_batch, batches))

    patience = tc.early_stopping_patience or tc.epochs + 1
    early = progress.early_stopping(patience)
    step_log = StepLog(tc.log_every)
    step_log.epoch_steps = list(progress.epoch_steps)
    last_save, logged_blocked = int(state.step), 0.0

    def save(val_loss: float | None = None) -> None:
        progress.epoch_steps = list(step_log.epoch_steps)
        progress.metrics_lines, progress.timing_lines = metrics_log.lines, timing_log.lines
        ckpt.save(int(state.step), state, dataclasses.asdict(progress), val_loss)

    bar = tqdm(total=tc.epochs * n_steps, initial=(progress.epoch - 1) * n_steps + progress.batch,
               disable=not (tc.progress and primary), unit="step", dynamic_ncols=True)
    try:
        for epoch in range(progress.epoch, 0 if progress.stopped_early else tc.epochs + 1):
            train_step = epoch_steps(state, epoch)
            t_epoch, first_batch = time.perf_counter(), progress.batch
            lr = cfg.optim.learning_rate * float(state.plateau_state.scale)
            step_log.start(int(state.step) + 1)
            for batch in input_pipeline.train_batches(train_images, train_labels, tc.batch_size,
                                                      tc.seed, epoch, first_batch, par.part):
                t_step = time.perf_counter()
                state, metrics = train_step(state, par.shard_batch(batch), train_rng)
                if progress.first_step_s is None:
                    jax.block_until_ready(state)
                    progress.first_step_s = time.perf_counter() - t_step
                progress.batch += 1
                bar.update(1)
                if not step_log.add(metrics):
                    continue
                record = step_log.pull(epoch)
                metrics_log.write(record)
                bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
                if progress.batch < n_steps:
                    step = int(state.step)
                    every = tc.checkpoint_every_steps
                    stopping = stop_at_step is not None and step >= stop_at_step
                    if stopping or (every and step - last_save >= every):
                        save()
                        last_save = step
                    if stopping:
                        return {"stopped_at_step": step, "run_dir": str(run_dir)}
            record = step_log.pull(epoch)  # syncs: the epoch's steps are done
            if record is not None:
                metrics_log.write(record)
            train_seconds = time.perf_counter() - t_epoch
            progress.epoch_rates.append((n_steps - first_batch) * tc.batch_size / train_seconds)
            val = eval_split(state, "val")
            train_loss, train_acc = step_log.epoch_means()
            early = early.update(val["loss"])
            if early.has_improved:
                progress.best_epoch, progress.best_step = epoch, int(state.step)
            progress.best_val_loss, progress.patience_count = float(early.best_metric), early.patience_count
            state = state.replace(plateau_state=plateau_step(plateau, state.plateau_state, val["loss"]))
            metrics_log.write({"kind": "epoch", "epoch": epoch, "step": int(state.step),
                               "train_loss": train_loss, "train_accuracy": train_acc,
                               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                               "learning_rate": lr, "improved": bool(early.has_improved)})
            seconds = time.perf_counter() - t_epoch
            timing_log.write({"epoch": epoch, "seconds": seconds, "train_seconds": train_seconds,
                              "train_images_per_s": progress.epoch_rates[-1],
                              "checkpoint_seconds": ckpt.seconds_blocked - logged_blocked})
            logged_blocked = ckpt.seconds_blocked
            if tc.progress and primary:
                bar.write(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                          f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}  lr {lr:.2e}  "
                          f"{seconds:.1f}s")
            progress.epoch, progress.batch = epoch + 1, 0
            progress.stopped_early = bool(early.should_stop)
            save(val["loss"] if early.has_improved else None)
            last_save = int(state.step)
            if progress.stopped_early:
                break
            if stop_at_step is not None and int(state.step) >= stop_at_step:
                return {"stopped_at_step": int(state.step), "run_dir": str(run_dir)}
    except FloatingPointError as err:
        ckpt.wait()
        steps = ckpt.steps()
        raise FloatingPointError(f"{err} Last good checkpoint: "
                                 f"{f'step {steps[-1]} in {ckpt.directory}' if steps else 'none yet'}.") from err
    finally:
        bar.close()
        metrics_log.close()
        timing_log.close()
        ckpt.close()
        ckpt_blocked_after_log = ckpt.seconds_blocked - logged_blocked

    ckpt = checkpoint.Checkpointer(run_dir, tc.keep_checkpoints, read_only=True)
    best_state, _, _ = ckpt.restore(par.abstract(state), step=progress.best_step)
    val, test = eval_split(best_state, "val"), eval_split(best_state, "test")
    summary_extra = {"devices": par.num_devices, "processes": jax.process_count(),
                     "grad_passes_per_step": passes}
    if not primary:
        return {"run_dir": str(run_dir), **summary_extra}
    timing = report.read_jsonl(run_dir / "timing.jsonl")
    epoch_seconds = sum(t["seconds"] for t in timing)
    checkpoint_seconds = sum(t["checkpoint_seconds"] for t in timing) + ckpt_blocked_after_log
    summary = {
        "dataset": cfg.data.dataset, "seed": tc.seed, "num_params": count_params(best_state.params),
        "best_epoch": progress.best_epoch, "best_step": progress.best_step,
        "epochs_run": progress.epoch - 1, "stopped_early": progress.stopped_early,
        "steps": int(state.step),
        "val": {"loss": val["loss"], "accuracy": val["accuracy"], "count": val["count"]},
        "test": test,
        "train_images_per_s": statistics.median(progress.epoch_rates[1:] or progress.epoch_rates),
        "first_step_s": progress.first_step_s, "wall_time_s": time.perf_counter() - t_start,
        "resumed": resuming, **summary_extra,
        "checkpoint_seconds": checkpoint_seconds,
        "checkpoint_fraction_of_epoch_time": checkpoint_seconds / epoch_seconds if epoch_seconds else 0.0,
    }
    summary["dead_filters"] = dead_filter_count(
        model, {"params": best_state.params, "batch_stats": best_state.batch_stats}, data.val[0], data.spec)
    report.write_json(run_dir / "summary.json", summary)
    plots.plot_run(run_dir)
    return {**summary, "run_dir": str(run_dir)}
