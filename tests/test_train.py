"""End to end on the embedded mnist5k digits: a run directory, replayable metrics, a loadable model."""

import json
import math

import numpy as np
import pytest

from cnnjax import Config, load_run, train_and_evaluate
from cnnjax.cli import main
from cnnjax.data.datasets import load
from cnnjax.report.logs import read_jsonl

SMALL = ["model.kwargs.features=8,16", "model.kwargs.dense=32", "train.epochs=2", "train.batch_size=64",
         "train.progress=false", "train.log_every=10"]


def small_config(*extra: str) -> Config:
    return Config().override(SMALL + list(extra))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "small"
    train_and_evaluate(small_config(), path)
    return path


def test_run_directory_holds_everything(run_dir):
    for name in ("config.json", "metrics.jsonl", "timing.jsonl", "summary.json", "loss.png",
                 "accuracy.png", "learning_rate.png", "grad_norm.png", "confusion_matrix.png", "ckpt"):
        assert (run_dir / name).exists(), name
    assert Config.from_dict(json.loads((run_dir / "config.json").read_text())) == small_config()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val"]["count"] == 800 and summary["test"]["count"] == 1000
    assert np.asarray(summary["test"]["confusion"]).sum() == 1000
    assert summary["test"]["accuracy"] > 0.8  # two epochs of a tiny CNN already learn digits
    # dead filters: conv channels whose ReLU output is 0 at every position of every validation
    # image, counted here from the model's own conv outputs
    import cnnjax
    run = load_run(run_dir)
    val = cnnjax.load_data(run.config.data, run.config.train.seed).val[0]
    _, state = run.model.apply(run.variables, cnnjax.normalize(val, run.spec.mean, run.spec.std),
                               mutable=["intermediates"])
    peaks = [np.asarray(v[0]).max(axis=(0, 1, 2)) for k, v in state["intermediates"].items()
             if k.startswith("conv")]
    assert [p.size for p in peaks] == [8, 16]
    assert summary["dead_filters"] == sum(int((p <= 0).sum()) for p in peaks)


def test_metrics_log_has_step_and_epoch_lines(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["step"] == 2 * (3200 // 64)
    assert [s["step"] for s in steps if s["epoch"] == 1] == [10, 20, 30, 40, 50]
    for s in steps:
        assert {"loss", "accuracy", "grad_norm"} <= set(s)
        assert not any("second" in k or "time" in k for k in s)  # wall-clock lives in timing.jsonl
    assert {k for k in steps[0] if k.startswith("grad_norm/")} == {
        "grad_norm/conv1", "grad_norm/conv2", "grad_norm/fc1", "grad_norm/fc2"}


def test_same_seed_same_bytes_other_seed_differs(run_dir, tmp_path):
    train_and_evaluate(small_config(), tmp_path / "again")
    train_and_evaluate(small_config("train.seed=1"), tmp_path / "other")
    first = (run_dir / "metrics.jsonl").read_bytes()
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == first
    assert (tmp_path / "other" / "metrics.jsonl").read_bytes() != first


def test_load_run_predicts_from_raw_pixels(run_dir):
    run = load_run(run_dir)
    images, labels = load("mnist5k", "test")
    logits = run.logits(images[:, :, :, 0])  # (N, 28, 28) is accepted as well as (N, 28, 28, 1)
    assert logits.shape == (1000, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(run.predict(images), logits.argmax(-1))
    accuracy = float((run.predict(images) == labels).mean())
    assert math.isclose(accuracy, run.summary["test"]["accuracy"], abs_tol=1e-9)


@pytest.mark.parametrize("bad, needle", [
    (np.full((2, 28, 28), 2.0, np.float32), "uint8"),
    (np.zeros((2, 32, 32), np.uint8), "shaped"),
    (np.zeros((28, 28), np.uint8), "shaped"),
])
def test_load_run_rejects_bad_images(run_dir, bad, needle):
    with pytest.raises(ValueError, match=needle):
        load_run(run_dir).predict(bad)


def test_cli_eval_matches_summary(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert out["accuracy"] == summary["test"]["accuracy"]
    assert out["count"] == 1000


def test_best_parameters_are_the_ones_kept(tmp_path):
    summary = train_and_evaluate(small_config("train.epochs=6", "train.early_stopping_patience=2",
                                              "optim.learning_rate=3e-3"), tmp_path / "es").summary
    epochs = [r for r in read_jsonl(tmp_path / "es" / "metrics.jsonl") if r["kind"] == "epoch"]
    best = min(epochs, key=lambda r: r["val_loss"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["val"]["accuracy"] == best["val_accuracy"]
    if summary["stopped_early"]:
        assert summary["epochs_run"] - summary["best_epoch"] == 2


@pytest.mark.parametrize("overrides, needle", [
    (["model.kwargs.kernel_size=9", "model.kwargs.padding=valid", "model.kwargs.features=8,8,8"], "conv3"),
    (["train.batch_size=5000"], "batch_size"),
    (["data.dataset=cifar11"], "cifar11"),
    (["model.kwargs.pool=median"], "median"),
])
def test_bad_config_fails_before_training(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        train_and_evaluate(small_config(*overrides), tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_refuses_to_overwrite_a_run(run_dir):
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train_and_evaluate(small_config(), run_dir)


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train_and_evaluate(small_config("optim.learning_rate=1e8", "train.log_every=1"), tmp_path / "nan")
