"""Comparing and combining runs, each checked against an independent reference: ensembles against
the members' own predictions averaged by hand, calibration against a hand-binned case, the
HParams summaries against config.json and summary.json read back through TensorBoard's own event
reader, the comparison page against a headless browser that must decode every image."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cnnjax import Config, compare_runs, load_ensemble, load_run, train_and_evaluate
from cnnjax.cli import main
from cnnjax.data.input_pipeline import load_data, load_split, select_classes
from cnnjax.training.calibration import expected_calibration_error, reliability

TINY = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "train.epochs=2",
        "train.batch_size=128", "data.classes=0,1,2", "train.progress=false"]
RATES = (3e-3, 1e-3, 1e-2)  # trials 0, 1, 2 of the study


def _train(path, *extra):
    return train_and_evaluate(Config().override([*TINY, *extra]), path).summary


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study directory as `cnnjax search` writes it: three complete trials of one seed at
    different learning rates, a pruned trial without a run and a failed one."""
    root = tmp_path_factory.mktemp("compare") / "study"
    trials = []
    for number, rate in enumerate(RATES):
        s = _train(root / "trials" / str(number), f"optim.learning_rate={rate}")
        trials.append({"number": number, "state": "COMPLETE",
                       "params": {"optim.learning_rate": rate}, "value": s["val"]["loss"],
                       "run_dir": f"trials/{number}", "wall_time_s": s["wall_time_s"],
                       "epochs": s["epochs_run"]})
    trials.append({"number": 3, "state": "PRUNED", "params": {"optim.learning_rate": 5e-4},
                   "value": 1.5, "run_dir": "trials/3", "wall_time_s": 1.0, "epochs": 1})
    trials.append({"number": 4, "state": "FAIL", "params": {"optim.learning_rate": 2e-2},
                   "value": None, "run_dir": "trials/4", "wall_time_s": 0.5, "epochs": 0})
    best = min(trials[:3], key=lambda t: t["value"])
    (root / "study.json").write_text(json.dumps({
        "name": "lr", "direction": "minimize", "monitor": "val_loss",
        "space": {"optim.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True, "step": None}},
        "best": {k: best[k] for k in ("number", "value", "params", "run_dir")},
        "trials": trials}))
    return root


@pytest.fixture(scope="module")
def others(study):
    """Runs beside the study: another model, another seed, the study's classes in another order
    (class 0 is digit 2: as foreign a label set as another subset, yet the same shapes and
    normalization, so it and seed1 run trial 1's compiled programs)."""
    root = study.parent / "others"
    _train(root / "wide", "model.kwargs.features=6,8")
    _train(root / "seed1", "train.seed=1")
    _train(root / "reordered", "data.classes=2,1,0")
    return root


def _trial(study, n):
    return study / "trials" / str(n)


def _test_set(run):
    images, labels = load_split(run.config.data, "test")
    return select_classes(images, labels, tuple(run.config.data.classes))


def _softmax(logits):
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- ensembles ------------------------------------------------------------------------------------

def test_an_ensemble_of_one_run_predicts_exactly_what_the_run_predicts(study):
    import scipy.special

    run = load_run(_trial(study, 0))
    images, labels = _test_set(run)
    for logits in (False, True):
        ensemble = load_ensemble([_trial(study, 0)], logits=logits)
        assert np.array_equal(ensemble.predict(images), run.predict(images))
        expected = scipy.special.softmax(run.logits(images).astype(np.float64), axis=-1)
        assert np.array_equal(ensemble.probabilities(images), expected)
    result = ensemble.evaluate(split="test")
    own = run.evaluate(split="test")
    assert result["accuracy"] == own["accuracy"] and result["confusion"] == own["confusion"]
    assert result["loss"] == pytest.approx(own["loss"], rel=1e-5)


def test_the_ensemble_averages_its_members_saved_predictions(study, tmp_path):
    out = tmp_path / "ens"
    assert main(["ensemble", "--study", str(study), "--out", str(out)]) == 0
    saved = json.loads((out / "ensemble.json").read_text())
    members = [pathlib.Path(m["run_dir"]) for m in saved["members"]]
    values = {_trial(study, n).resolve(): json.loads((_trial(study, n) / "summary.json").read_text())
              ["val"]["loss"] for n in range(3)}
    assert members == sorted(values, key=values.get)  # ranked by the study's values
    runs = [load_run(m) for m in members]
    images, labels = _test_set(runs[0])
    by_hand = np.mean([_softmax(r.logits(images)) for r in runs], axis=0)
    assert saved["test"]["accuracy"] == np.mean(by_hand.argmax(-1) == labels)
    # members of one model run under vmap: float32 logits equal to rounding
    assert saved["test"]["loss"] == pytest.approx(-np.mean(np.log(by_hand[np.arange(len(labels)),
                                                                           labels])), rel=1e-6)
    npz = np.load(out / "predictions.npz")
    np.testing.assert_allclose(npz["probabilities"], by_hand, atol=1e-6)
    np.testing.assert_allclose(npz["probabilities"].sum(-1), 1.0, atol=1e-12)
    assert np.array_equal(npz["labels"], labels)
    for member, run in zip(saved["members"], runs):  # each member's figures are its run's own
        assert member["accuracy"] == json.loads((run.run_dir / "summary.json").read_text()
                                                )["test"]["accuracy"]
    assert saved["best_member"]["run_dir"] == str(members[0])


def test_members_of_one_model_share_one_program_and_others_join_it(study, others):
    dirs = [_trial(study, n) for n in range(3)] + [others / "wide"]
    ensemble = load_ensemble(dirs, logits=True)
    order = [m.run_dir.resolve() for m in ensemble.members]
    wide = order.index((others / "wide").resolve())
    assert sorted(map(sorted, ensemble.groups)) == sorted(
        [sorted(set(range(4)) - {wide}), [wide]])
    runs = [load_run(d) for d in order]
    images, _ = _test_set(runs[0])
    member_logits = ensemble.member_logits(images, batch_size=256)  # several chunks
    for run, logits in zip(runs, member_logits):
        np.testing.assert_allclose(logits, run.logits(images), atol=1e-5)
    mean_logits = np.mean([r.logits(images).astype(np.float64) for r in runs], axis=0)
    probabilities = ensemble.probabilities(images)
    np.testing.assert_allclose(probabilities, _softmax(mean_logits), atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-12)


def test_top_k_and_validation_weights_follow_the_summaries(study, others):
    dirs = [_trial(study, n) for n in range(3)] + [others / "seed1"]
    loss = {d.resolve(): json.loads((d / "summary.json").read_text())["val"]["loss"] for d in dirs}
    ensemble = load_ensemble(dirs, top_k=2, weights="val")
    chosen = [m.run_dir.resolve() for m in ensemble.members]
    assert chosen == sorted(loss, key=loss.get)[:2]
    inverse = np.array([1 / loss[d] for d in chosen])
    np.testing.assert_allclose(ensemble.weights, inverse / inverse.sum(), rtol=1e-12)


def test_greedy_selection_lowers_the_shared_validation_loss(study):
    ensemble = load_ensemble(study, method="greedy", rounds=6)
    history = ensemble.selection["history"]
    assert len(history) == 6 and np.isclose(ensemble.weights.sum(), 1.0)
    runs = {r.run_dir.resolve(): r for r in (load_run(_trial(study, n)) for n in range(3))}
    images, labels = load_data(next(iter(runs.values())).config.data, 0).val
    probs = {d: _softmax(r.logits(images)) for d, r in runs.items()}
    nll = {d: -np.mean(np.log(p[np.arange(len(labels)), labels])) for d, p in probs.items()}
    assert history[0]["added"] == str(min(nll, key=nll.get))  # round 1: the best single member
    mixed = sum(w * probs[m.run_dir.resolve()] for m, w in zip(ensemble.members, ensemble.weights))
    chosen = -np.mean(np.log(mixed[np.arange(len(labels)), labels]))
    assert chosen == pytest.approx(min(h["val_loss"] for h in history), rel=1e-6)  # vmap's float32
    assert chosen <= min(nll.values()) + 1e-12


def test_mismatched_members_and_unshared_validation_splits_are_refused(study, others):
    # the better-ranked member is the reference the other is named against
    differ = r"data.classes: (\[0, 1, 2\] vs \[2, 1, 0\]|\[2, 1, 0\] vs \[0, 1, 2\])"
    with pytest.raises(ValueError, match=differ):
        load_ensemble([_trial(study, 0), others / "reordered"])
    mixed = load_ensemble([_trial(study, 0), others / "seed1"])
    with pytest.raises(ValueError, match="different train/validation splits"):
        mixed.evaluate(split="val")
    with pytest.raises(ValueError, match="different train/validation splits"):
        load_ensemble([_trial(study, 0), others / "seed1"], method="greedy")
    assert main(["ensemble", "--runs", str(_trial(study, 0)), str(others / "reordered")]) == 2
    with pytest.raises(ValueError, match="greedy selection sets the weights"):
        load_ensemble(study, method="greedy", weights="val")


# --- calibration ----------------------------------------------------------------------------------

def test_expected_calibration_error_of_a_hand_binned_case():
    # 15 bins of width 1/15: 0.95 and 1.0 fall in the last, 0.55 in [8/15, 9/15)
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45], [0.45, 0.55], [1.0, 0.0]])
    labels = np.array([0, 0, 0, 1, 0])
    # last bin: 0.95 right, 0.95 wrong, 1.0 right -> accuracy 2/3, confidence 2.9/3;
    # the 0.55 bin: both right -> accuracy 1, confidence 0.55
    by_hand = 3 / 5 * abs(2 / 3 - 2.9 / 3) + 2 / 5 * abs(1 - 0.55)
    assert expected_calibration_error(probs, labels) == pytest.approx(by_hand, abs=1e-12)
    table = reliability(probs, labels)
    assert table.count.sum() == 5 and table.count[-1] == 3 and table.count[8] == 2
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0  # sure and right
    with pytest.raises(ValueError, match="N labels"):
        expected_calibration_error(probs, labels[:3])


# --- TensorBoard's HParams ------------------------------------------------------------------------

def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif value is not None:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def test_every_run_writes_its_hparams_and_final_metrics_for_tensorboard(study):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata
    from tensorboard.util.tensor_util import make_ndarray

    # the multiplexer TensorBoard's server reads a --logdir with
    mux = EventMultiplexer().AddRunsFromDirectory(str(study))
    mux.Reload()
    sessions = {run: tags for run, tags in mux.PluginRunToTagToContent("hparams").items()
                if metadata.SESSION_START_INFO_TAG in tags}
    assert sorted(sessions) == [f"trials/{n}/tensorboard" for n in range(3)]
    for n in range(3):
        run_dir = _trial(study, n)
        name = f"trials/{n}/tensorboard"
        start = metadata.parse_session_start_info_plugin_data(
            sessions[name][metadata.SESSION_START_INFO_TAG])
        written = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
        expected = _flat(json.loads((run_dir / "config.json").read_text()))
        assert set(written) == set(expected)
        for key, value in expected.items():
            assert written[key] == value and type(written[key]) is (
                float if type(value) is int else type(value)), key
        summary = json.loads((run_dir / "summary.json").read_text())
        for tag, value in [("best_epoch", summary["best_epoch"]),
                           ("val_loss", summary["val"]["loss"]),
                           ("val_accuracy", summary["val"]["accuracy"]),
                           ("test_loss", summary["test"]["loss"]),
                           ("test_accuracy", summary["test"]["accuracy"])]:
            (event,) = mux.Tensors(name, f"hparams/{tag}")
            assert float(make_ndarray(event.tensor_proto)) == pytest.approx(value, rel=1e-6)
            assert event.step == summary["steps"]
        assert metadata.SESSION_END_INFO_TAG in sessions[name]
        assert "epoch/val_loss" in mux.PluginRunToTagToContent("scalars")[name]  # with its curves


# --- the comparison page --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(study):
    assert main(["compare", str(study)]) == 0
    return study / "compare" / "compare.html"


def test_the_comparison_ranks_the_trials_and_shows_only_what_differs(page, study):
    record = json.loads((page.parent / "compare.json").read_text())
    values = {t["number"]: t["value"] for t in json.loads((study / "study.json").read_text())
              ["trials"] if t["state"] == "COMPLETE"}
    assert [r["run"] for r in record["runs"]] == [f"trial {n}" for n in
                                                  sorted(values, key=values.get)]
    assert record["differing_keys"] == ["optim.learning_rate"]
    assert [r["settings"]["optim.learning_rate"] for r in record["runs"]] == [
        RATES[n] for n in sorted(values, key=values.get)]
    for row in record["runs"]:  # the table's numbers are the runs' own
        s = json.loads((pathlib.Path(row["run_dir"]) / "summary.json").read_text())
        assert (row["test_accuracy"], row["best_epoch"]) == (s["test"]["accuracy"], s["best_epoch"])
        run = load_run(row["run_dir"])
        images, labels = _test_set(run)
        assert row["test_ece"] == pytest.approx(
            expected_calibration_error(_softmax(run.logits(images)), labels), abs=1e-9)
    assert record["study"]["states"] == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 1}
    assert set(record["study"]["importances"]) == {"optim.learning_rate"}
    html = page.read_text()
    for text in ("Settings against the best", "Optimization history", "Parameter importances",
                 "Parallel coordinates", "Slices", "Calibration and ensemble", "ECE"):
        assert text in html, text
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == 8 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert main(["compare", str(study / "nowhere")]) == 2


def test_comparing_runs_leaves_the_matplotlib_backend_alone(study, others, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")
        from cnnjax import compare_runs
        compare_runs([{str(study)!r}], {str(tmp_path / 'a')!r}, calibrate=False)
        compare_runs([{str(others / 'wide')!r}, {str(others / 'seed1')!r}],
                     {str(tmp_path / 'b')!r}, calibrate=False)
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["svg", "False"], out.stdout + out.stderr
    runs = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert runs["differing_keys"] == ["model.kwargs.features", "train.seed"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (apt-get install -y chromium)")
def test_the_comparison_renders_in_headless_chromium_with_every_image_loaded(page, tmp_path):
    import matplotlib.image

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    url = page.resolve().as_uri()
    dom = subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom",
                          url], capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert total == 8 and loaded == total
    shot = tmp_path / "compare.png"
    subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'shot'}",
                    f"--screenshot={shot}", "--window-size=1280,3000", url],
                   capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1280) and pixels[..., :3].std() > 0.05  # not a blank page
