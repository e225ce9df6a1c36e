"""Run directories written by an earlier cnnjax (tests/data/legacy_*: before models took `kwargs`
and the loop state its own layout; made by the commit 82da0c7 from a 4-8-16 seed CNN with dropout
and rotation, 2 epochs of batch 128, watching val_accuracy) still load, evaluate and resume.

`legacy_run` is finished, with the logits of the first 8 test digits its own `load_run` gave;
`legacy_stopped` is the same config stopped at the end of epoch 1 (`--stop-at-step 25`)."""

import json
import pathlib
import shutil

import numpy as np

import cnnjax
from cnnjax.cli import main
from cnnjax.config import ModelConfig

DATA = pathlib.Path(__file__).parent / "data"


def test_an_earlier_finished_run_loads_through_the_migration(tmp_path, capsys):
    run_dir = shutil.copytree(DATA / "legacy_run", tmp_path / "run")
    cfg = cnnjax.load_config(run_dir)
    assert cfg.model == ModelConfig("seed_cnn", {"features": [4, 8], "dense": [16], "dropout": 0.25})
    run = cnnjax.load_run(run_dir)
    images, _ = cnnjax.load_split(cfg.data, "test")
    np.testing.assert_allclose(run.logits(images[:8]), np.load(run_dir / "expected_logits.npy"),
                               rtol=1e-6, atol=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.evaluate(split="test")["accuracy"] == summary["test"]["accuracy"]
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"] == summary["test"]["accuracy"]


def test_an_earlier_stopped_run_resumes_to_the_bytes_of_its_uninterrupted_run(tmp_path):
    """The earlier loop state (its `Progress`: best_val_loss held 1 - accuracy) is read as today's,
    and the resumed run writes what the earlier cnnjax wrote without stopping."""
    run_dir = shutil.copytree(DATA / "legacy_stopped", tmp_path / "stopped")
    result = cnnjax.train_and_evaluate(cnnjax.load_config(run_dir), run_dir)
    assert result.finished and result.summary["resumed"]
    assert (run_dir / "metrics.jsonl").read_bytes() == \
        (DATA / "legacy_run" / "metrics.jsonl").read_bytes()
    whole = json.loads((DATA / "legacy_run" / "summary.json").read_text())
    assert (result.summary["best_step"], result.summary["test"]) == (whole["best_step"], whole["test"])
