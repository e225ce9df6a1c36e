"""The training loop: data -> model -> compiled steps -> plateau rule and early stopping -> run dir.

`train_and_evaluate(config, run_dir)` is the whole job; the CLI and experiment scripts call it.
Every check that can fail on the user's input (dataset, geometry, batch size, run directory) runs
before anything is compiled.
"""

from __future__ import annotations

import datetime
import pathlib
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax.training.early_stopping import EarlyStopping
from tqdm.auto import tqdm

from cnnjax import checkpoint, input_pipeline, report
from cnnjax.config import Config
from cnnjax.models import build_model, check_geometry, count_params
from cnnjax.optim import make_optimizer, make_plateau, plateau_step
from cnnjax.steps import create_train_state, evaluate, make_eval_step, make_train_step

DEFAULT_ROOT = pathlib.Path("checkpoints")


def default_run_dir(cfg: Config, root: pathlib.Path = DEFAULT_ROOT) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{cfg.data.dataset}-{cfg.model.name}-s{cfg.train.seed}-{stamp}"


def _prepare_run_dir(run_dir: pathlib.Path) -> pathlib.Path:
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another "
                              f"--run-dir or delete it.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class _StepLog:
    """Collects per-step metrics on device and pulls them to the host once per `every` steps."""

    def __init__(self, every: int):
        if every <= 0:
            raise ValueError(f"train.log_every must be positive, got {every}.")
        self.every = every
        self.pending: list[dict] = []
        self._epoch: list[tuple[float, float]] = []

    def add(self, metrics: dict) -> bool:
        self.pending.append(metrics)
        return len(self.pending) >= self.every

    def pull(self, first_step: int, epoch: int) -> dict[str, Any] | None:
        """Window means as one deterministic record; raises on the first non-finite step."""
        if not self.pending:
            return None
        window = jax.device_get(self.pending)  # one host-device sync for the whole window
        self.pending = []
        for i, m in enumerate(window):
            if not m["finite"]:
                raise FloatingPointError(
                    f"non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) "
                    f"at step {first_step + i} (epoch {epoch}); the update was not applied. Lower "
                    f"optim.learning_rate or check the data.")
        self._epoch += [(float(m["loss"]), float(m["accuracy"])) for m in window]
        keys = [k for k in window[0] if k != "finite"]
        record = {k: float(np.mean([m[k] for m in window])) for k in keys}
        return {"kind": "step", "epoch": epoch, "step": first_step + len(window) - 1, **record}


    def epoch_means(self) -> tuple[float, float]:
        """Mean train loss and accuracy over every step pulled since the last call."""
        loss, acc = np.mean(self._epoch, axis=0)
        self._epoch = []
        return float(loss), float(acc)


def train_and_evaluate(cfg: Config, run_dir: pathlib.Path | str | None = None) -> dict[str, Any]:
    """Trains `cfg`'s model, keeps the best-validation parameters, writes the run directory.

    Returns the run summary (also saved as summary.json).
    """
    t_start = time.perf_counter()
    tc = cfg.train
    data = input_pipeline.load_data(cfg.data, tc.seed)
    model = build_model(cfg.model, data.spec.num_classes)
    check_geometry(model, data.spec.image_shape)
    train_images, train_labels = data.train
    n_steps = input_pipeline.steps_per_epoch(len(train_labels), tc.batch_size)
    if tc.epochs <= 0:
        raise ValueError(f"train.epochs must be positive, got {tc.epochs}.")
    tx, plateau = make_optimizer(cfg.optim), make_plateau(cfg.optim)
    run_dir = _prepare_run_dir(run_dir if run_dir is not None else default_run_dir(cfg))
    (run_dir / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")

    init_rng, train_rng = jax.random.split(jax.random.key(tc.seed))
    state = create_train_state(model, tx, plateau, data.spec.image_shape, init_rng)
    del init_rng
    train_step = make_train_step(model, tx, data.spec.mean, data.spec.std)
    eval_step = make_eval_step(model, data.spec.mean, data.spec.std, data.spec.num_classes)
    metrics_log = report.JsonlWriter(run_dir / "metrics.jsonl")
    timing_log = report.JsonlWriter(run_dir / "timing.jsonl")
    early = EarlyStopping(patience=tc.early_stopping_patience or tc.epochs + 1)
    best = {"epoch": 0, "params": None, "batch_stats": None}
    step_log = _StepLog(tc.log_every)
    epoch_rates, first_step_s, epoch = [], None, 0
    bar = tqdm(total=tc.epochs * n_steps, disable=not tc.progress, unit="step", dynamic_ncols=True)
    try:
        for epoch in range(1, tc.epochs + 1):
            t_epoch = time.perf_counter()
            lr = cfg.optim.learning_rate * float(state.plateau_state.scale)
            window_start = int(state.step) + 1
            for batch in input_pipeline.train_batches(train_images, train_labels, tc.batch_size,
                                                      tc.seed, epoch):
                t_step = time.perf_counter()
                state, metrics = train_step(state, batch, train_rng)
                if first_step_s is None:
                    jax.block_until_ready(state)
                    first_step_s = time.perf_counter() - t_step
                bar.update(1)
                if step_log.add(metrics):
                    record = step_log.pull(window_start, epoch)
                    metrics_log.write(record)
                    window_start = record["step"] + 1
                    bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}",
                                    acc=f"{record['accuracy']:.3f}")
            record = step_log.pull(window_start, epoch)  # syncs: the epoch's steps are done
            if record is not None:
                metrics_log.write(record)
            train_seconds = time.perf_counter() - t_epoch
            epoch_rates.append(n_steps * tc.batch_size / train_seconds)
            val = evaluate(eval_step, state, input_pipeline.eval_batches(*data.val, tc.eval_batch_size))
            seconds = time.perf_counter() - t_epoch
            train_loss, train_acc = step_log.epoch_means()
            early = early.update(val["loss"])
            if early.has_improved:
                best = {"epoch": epoch, "params": jax.device_get(state.params),
                        "batch_stats": jax.device_get(state.batch_stats)}
            state = state.replace(plateau_state=plateau_step(plateau, state.plateau_state, val["loss"]))
            metrics_log.write({"kind": "epoch", "epoch": epoch, "step": int(state.step),
                               "train_loss": train_loss, "train_accuracy": train_acc,
                               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                               "learning_rate": lr, "improved": bool(early.has_improved)})
            timing_log.write({"epoch": epoch, "seconds": seconds, "train_seconds": train_seconds,
                              "train_images_per_s": epoch_rates[-1]})
            if tc.progress:
                bar.write(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                          f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}  lr {lr:.2e}  "
                          f"{seconds:.1f}s")
            if early.should_stop:
                break
    finally:
        bar.close()
        metrics_log.close()
        timing_log.close()

    state = state.replace(params=best["params"], batch_stats=best["batch_stats"])
    variables = {"params": best["params"], "batch_stats": best["batch_stats"]}
    checkpoint.save_variables(run_dir / checkpoint.MODEL_DIR, variables)
    val = evaluate(eval_step, state, input_pipeline.eval_batches(*data.val, tc.eval_batch_size))
    test = evaluate(eval_step, state, input_pipeline.eval_batches(*data.test, tc.eval_batch_size))
    summary = {
        "dataset": cfg.data.dataset, "seed": tc.seed, "num_params": count_params(best["params"]),
        "best_epoch": best["epoch"], "epochs_run": epoch, "stopped_early": bool(early.should_stop),
        "steps": int(state.step),
        "val": {"loss": val["loss"], "accuracy": val["accuracy"], "count": val["count"]},
        "test": test,
        "train_images_per_s": statistics.median(epoch_rates[1:] or epoch_rates),
        "first_step_s": first_step_s, "wall_time_s": time.perf_counter() - t_start,
    }
    report.write_json(run_dir / "summary.json", summary)
    report.plot_run(run_dir)
    return {**summary, "run_dir": str(run_dir)}
