"""Callbacks and the loop's stages: what a user's callback sees, evaluating at chosen steps,
stopping and resuming exactly, TensorBoard scalars read back, and the loop composed by hand."""

import json

import numpy as np
import pytest

import cnnjax
from cnnjax import Callback, Config, Periodic, load_run, read_jsonl, train_and_evaluate

SMALL = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "train.epochs=2", "train.batch_size=64",
         "train.progress=false", "train.log_every=5"]
STEPS_PER_EPOCH = 3200 // 64


def small_config(*extra: str) -> Config:
    return Config().override(SMALL + list(extra))


class Recorder(Callback):
    """Writes down every hook call."""

    def __init__(self):
        self.steps, self.logs, self.epochs, self.ends, self.starts = [], [], [], [], 0

    def on_train_start(self, event):
        self.starts += 1

    def on_step(self, event):
        self.steps.append((event.epoch, event.step, float(event.metrics["loss"])))

    def on_log(self, event):
        self.logs.append(event.record)

    def on_epoch_end(self, event):
        self.epochs.append((event.record, event.timing))

    def on_train_end(self, event):
        self.ends.append(dict(event.summary))
        event.summary["recorded_steps"] = len(self.steps)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run with a recorder, an evaluation at steps 0, 10 and 60, and a
    checkpoint every 10 steps."""
    run_dir = tmp_path_factory.mktemp("cb") / "whole"
    recorder = Recorder()
    probe = Periodic(lambda e: e.evaluate("val")["accuracy"], at_steps=(0, 10, 60))
    result = train_and_evaluate(small_config("train.keep_checkpoints=100",
                                             "train.checkpoint_every_steps=10"),
                                run_dir, callbacks=[recorder, probe])
    return run_dir, result, recorder, probe


def test_a_callback_sees_every_step_and_epoch(whole):
    run_dir, result, rec, _ = whole
    assert result.finished and rec.starts == 1
    assert [s for _, s, _ in rec.steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [e for e, _, _ in rec.steps] == [1] * STEPS_PER_EPOCH + [2] * STEPS_PER_EPOCH
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert rec.logs == [r for r in lines if r["kind"] == "step"]
    assert [r for r, _ in rec.epochs] == [r for r in lines if r["kind"] == "epoch"]
    assert [t for _, t in rec.epochs] == read_jsonl(run_dir / "timing.jsonl")
    # the per-step losses the callback read are the ones the log windows average
    first = rec.logs[0]
    assert first["step"] == 5
    assert first["loss"] == pytest.approx(np.mean([loss for _, _, loss in rec.steps[:5]]), rel=1e-6)
    # on_train_end may add to the summary, which is then written
    assert json.loads((run_dir / "summary.json").read_text())["recorded_steps"] == 2 * STEPS_PER_EPOCH
    assert result.summary["recorded_steps"] == 2 * STEPS_PER_EPOCH


def test_evaluating_at_given_steps_matches_the_checkpoint_of_that_step(whole):
    """The in-loop evaluations against the checkpoints of those steps, restored in a Run."""
    run_dir, _, _, probe = whole
    assert [s for s, _ in probe.results] == [0, 10, 60]
    data = cnnjax.load_data(small_config().data, 0)
    for step, accuracy in probe.results[1:]:
        restored = load_run(run_dir, step=step).evaluate(*data.val)
        assert accuracy == restored["accuracy"], step
    assert probe.results[0][1] < probe.results[2][1]  # it learns between step 0 and step 60


class StopAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_step(self, event):
        if event.step == self.at:
            event.control.stop(f"user stop at {self.at}")


def test_a_callback_stops_the_run_and_it_resumes_exactly(whole, tmp_path):
    whole_dir = whole[0]
    run_dir = tmp_path / "stopped"
    cfg = small_config("train.keep_checkpoints=100", "train.checkpoint_every_steps=10")
    # asked at step 12, mid log window: takes effect at the step-15 log line, after a checkpoint
    stopped = train_and_evaluate(cfg, run_dir, callbacks=[StopAt(12)])
    assert (stopped.stopped_at_step, stopped.stop_reason, stopped.summary) == (15, "user stop at 12", None)
    assert not (run_dir / "summary.json").exists()
    # and at an epoch end, from on_epoch_end
    class StopAtEpochEnd(Callback):
        def on_epoch_end(self, event):
            event.control.stop("epoch done")
    assert train_and_evaluate(cfg, run_dir, callbacks=[StopAtEpochEnd()]).stopped_at_step == STEPS_PER_EPOCH
    resumed = train_and_evaluate(cfg, run_dir)
    assert resumed.finished and resumed.summary["resumed"]
    assert (run_dir / "metrics.jsonl").read_bytes() == (whole_dir / "metrics.jsonl").read_bytes()
    # the stopped runs wrote events past the checkpoints they resumed from: purged, not doubled
    assert_tensorboard_equals_metrics(run_dir)


def assert_tensorboard_equals_metrics(run_dir):
    """Every number of metrics.jsonl once, at its step, read back with TensorBoard's own reader
    (which applies a resumed run's purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    lines = read_jsonl(run_dir / "metrics.jsonl")
    expected = {}
    for r in lines:
        prefix = "train" if r["kind"] == "step" else "epoch"
        for key, value in r.items():
            if key not in ("kind", "epoch", "step") and not isinstance(value, str):
                expected.setdefault(f"{prefix}/{key}", []).append((r["step"], float(value)))
    assert "train/grad_norm/conv1" in expected and "epoch/learning_rate" in expected
    # hparams/* are the HParams callback's final figures (tests/test_compare.py checks them)
    assert sorted(t for t in events.Tags()["scalars"] if not t.startswith("hparams/")) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        np.testing.assert_array_equal(np.float32([v for _, v in got]),
                                      np.float32([v for _, v in points]), err_msg=tag)


def test_tensorboard_scalars_equal_metrics_jsonl(whole):
    assert_tensorboard_equals_metrics(whole[0])


def test_the_stages_by_hand_are_a_plain_training_loop(tmp_path):
    """README's recipe, the stages called by a script, against a training loop written here from
    the public step API alone: the same batches (a function of seed and epoch), the same train
    key, one validation pass per epoch; the epoch lines' figures are that loop's, bit for bit."""
    cfg = small_config("train.early_stopping_patience=0")
    run, state, loop = cnnjax.setup(cfg, tmp_path / "by-hand")
    hooks = cnnjax.CallbackList(cnnjax.default_callbacks(cfg))
    loop = cnnjax.start(run, state, loop, hooks)
    for epoch in run.epochs(loop):
        state, loop = cnnjax.train_epoch(run, state, loop, hooks)
        state, loop = cnnjax.end_epoch(run, state, loop, hooks)
        if loop.stop_reason or loop.stopped_early:
            break
    result = cnnjax.finish(run, state, loop, hooks)
    hooks.close()
    assert result.finished and loop.epoch == 3

    data = cnnjax.load_data(cfg.data, 0)
    parts = cnnjax.build(cfg, data.spec, STEPS_PER_EPOCH)
    init_key, train_key = cnnjax.seed_keys(0)
    state, step, expected = parts.init_state(init_key), parts.epoch_steps[0], []
    for epoch in (1, 2):  # the plateau rule cuts after 4 epochs: its scale stays 1 here
        losses = []
        for batch in cnnjax.train_batches(*data.train, 64, 0, epoch):
            state, metrics = step(state, batch, train_key)
            losses.append(float(metrics["loss"]))
        val = cnnjax.evaluate(parts.eval_step, state, cnnjax.eval_batches(*data.val, 800))
        expected.append((epoch * STEPS_PER_EPOCH, float(np.mean(losses)), val["loss"],
                         val["accuracy"]))
    epochs = [r for r in read_jsonl(tmp_path / "by-hand" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [(r["step"], r["train_loss"], r["val_loss"], r["val_accuracy"]) for r in epochs] == expected


def test_bad_callbacks_and_triggers_are_refused():
    with pytest.raises(ValueError, match="needs a trigger"):
        Periodic(print)
    with pytest.raises(ValueError, match="every_steps=0"):
        Periodic(print, every_steps=0)
    with pytest.raises(TypeError, match="not a callback"):
        cnnjax.CallbackList([object()])
    assert cnnjax.is_due(10, every=5) and cnnjax.is_due(7, at=(7,)) and not cnnjax.is_due(7, every=5)
    # asked at log lines 7 steps apart, a multiple of 10 passed since the last one: 14, 21, 35, ...
    asked = range(7, 71, 7)
    assert [s for p, s in zip([0, *asked], asked) if cnnjax.is_due(s, every=10, since=p)] == \
        [14, 21, 35, 42, 56, 63, 70]
    assert not cnnjax.is_due(9, at=(5,), since=5) and cnnjax.is_due(9, at=(6,), since=5)
