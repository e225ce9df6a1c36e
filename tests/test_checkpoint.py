"""Checkpoints and exact resume: an interrupted run continues as if nothing happened."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnjax import Config, load_run, train_and_evaluate
from cnnjax.training.checkpoint import Checkpointer
from cnnjax.cli import main

# Dropout, batch norm and augmentation on: their draws and statistics must replay too. 50 steps per
# epoch, a log line every 10. The model and augmentation of test_regularization's runs: the
# compiled programs are shared through the cache.
CFG = ["model.kwargs.features=8,16", "model.kwargs.dense=32", "train.epochs=2", "train.progress=false",
       "model.kwargs.dropout=0.5", "model.kwargs.batch_norm=true", "augment.rotate=10",
       "augment.translate=2", "augment.scale=0.1", "train.log_every=10"]


def config(*extra):
    return Config().override(CFG + list(extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "whole"
    train_and_evaluate(config(), path)
    return path


def test_resume_after_epoch_and_mid_epoch_is_byte_identical(uninterrupted, tmp_path):
    run = tmp_path / "interrupted"
    first = train_and_evaluate(config(), run, stop_at_step=25)  # mid-epoch 1, at the step-30 log line
    assert (first.stopped_at_step, first.run_dir, first.summary) == (30, run, None)
    assert train_and_evaluate(config(), run, stop_at_step=50).stopped_at_step == 50  # end of epoch 1
    summary = train_and_evaluate(config(), run).summary
    assert summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    whole = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["test"] == whole["test"] and summary["best_step"] == whole["best_step"]


def test_checkpoints_kept_and_best_one_restored(uninterrupted):
    ckpt = Checkpointer(uninterrupted, read_only=True)
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["best_step"] in ckpt.steps()
    assert ckpt.steps()[-1] == summary["steps"]
    assert summary["checkpoint_seconds"] >= 0 and 0 <= summary["checkpoint_fraction_of_epoch_time"] < 1
    run = load_run(uninterrupted)
    other = load_run(uninterrupted, step=ckpt.steps()[-1])
    if summary["best_step"] != ckpt.steps()[-1]:
        assert not np.array_equal(run.variables["params"]["fc2"]["kernel"],
                                  other.variables["params"]["fc2"]["kernel"])
    # the best parameters, restored and evaluated anew, score what the run's end measured
    assert run.evaluate(split="test") == summary["test"]


def test_conflicting_override_is_refused(tmp_path):
    run = tmp_path / "run"
    train_and_evaluate(config(), run, stop_at_step=10)
    with pytest.raises(ValueError, match=r"optim\.learning_rate: 0\.001 -> 0\.01"):
        train_and_evaluate(config("optim.learning_rate=0.01"), run)
    # The CLI reads the config back from the run; a clashing flag is refused the same way.
    assert main(["train", "--resume", str(run), "--epochs", "5", "--quiet"]) == 2
    assert main(["train", "--resume", str(run), "--quiet", "--stop-at-step", "20"]) == 0


def test_architecture_mismatch_names_each_parameter(uninterrupted, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "ckpt").symlink_to(uninterrupted / "ckpt")
    cfg = json.loads((uninterrupted / "config.json").read_text())
    cfg["model"]["kwargs"]["dense"] = [48]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_run(run)
    msg = str(err.value)
    assert "params/fc1/kernel: checkpoint (784, 32) vs model (784, 48)" in msg
    assert "params/fc2/kernel: checkpoint (32, 10) vs model (48, 10)" in msg


def test_no_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(config().to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path)


def _truncate_arrays(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return files


def test_damaged_latest_checkpoint_is_skipped(uninterrupted, tmp_path):
    import shutil
    run = tmp_path / "damaged"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    steps = Checkpointer(run, read_only=True).steps()
    assert _truncate_arrays(run / "ckpt" / str(steps[-1]))
    with pytest.warns(RuntimeWarning, match=rf"ckpt/{steps[-1]} is damaged"):
        state, loop, step = Checkpointer(run, read_only=True).restore(_abstract(run))
    assert step == steps[-2]


def _abstract(run):
    import jax
    from cnnjax.data.datasets import get_spec
    from cnnjax.nn.models import build_model
    from cnnjax.training.optim import make_optimizer, make_plateau
    from cnnjax.training.runs import load_config
    from cnnjax.training.steps import create_train_state
    cfg = load_config(run)
    model = build_model(cfg.model, 10)
    return jax.eval_shape(lambda: create_train_state(model, make_optimizer(cfg.optim),
                                                     make_plateau(cfg.optim), get_spec("mnist5k").image_shape,
                                                     jax.random.key(0)))


def test_sigkill_while_saving_loses_nothing(uninterrupted, tmp_path):
    """Kill the trainer while orbax writes a checkpoint; the rerun resumes and matches."""
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cnnjax", "train", "--quiet", "--run-dir", str(run)]
    for item in CFG + ["train.checkpoint_every_steps=10"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir, deadline, seen_tmp = run / "ckpt", time.monotonic() + 120, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.exists() else []
            finished = [n for n in names if n.isdigit()]
            if any("tmp" in n for n in names) and len(finished) >= 2:
                seen_tmp = True
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen_tmp, "never caught a checkpoint being written"
    summary = train_and_evaluate(config("train.checkpoint_every_steps=10"), run).summary
    assert summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()


def test_a_reopened_checkpointer_still_keeps_the_best_step(tmp_path):
    """Each save's metrics are written into its step, so the checkpointer of a resumed run knows
    the best one among the steps it finds and keeps it while newer saves push the others out."""
    state = {"w": np.zeros(3, np.float32)}
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step, best in ((1, {"val_loss": 2.0}), (2, {"val_loss": 1.0}), (3, None), (4, None)):
        ckpt.save(step, state, {"step": step}, best)
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)  # the resumed run's
    for step in (5, 6, 7):
        ckpt.save(step, state, {"step": step})
    assert ckpt.steps() == [2, 6, 7]
    ckpt.close()
