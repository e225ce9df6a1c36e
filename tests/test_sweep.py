"""cnnjax sweep: many runs in one process, each member its own run (cnnjax/training/sweep.py).

References: plain SGD written out with jax.grad alone, each member's own `cnnjax train` run of its
config.json, and the same sweep uninterrupted (for resume after SIGKILL)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnnjax
from cnnjax.config import Config
from cnnjax.training import builder, traced
from cnnjax.training.checkpoint import Checkpointer
from cnnjax.training.grid import parse_grid
from cnnjax.training.loop import train_and_evaluate
from cnnjax.training.sweep import make_sweep_step, run_sweep

IMAGE_SHAPE = (28, 28, 1)
SPEC = cnnjax.DatasetSpec("random", 10, IMAGE_SHAPE, 0.5, 0.25, ("train", "test"), False)
# Plain SGD without decay or momentum: each member's step is params - lr * grad, written out below
# with jax.grad alone, independently of cnnjax's train step.
PLAIN_SGD = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "optim.name=sgd",
             "optim.momentum=0", "optim.weight_decay=0"]


def sgd_reference(model, seed, batches, lr, mean=0.5, std=0.25):
    """The member's parameters after plain SGD on `batches`, and each step's loss: init from its
    seed's init key (split(key(seed))[0]) on one image, the batch-mean cross-entropy. (The
    gradient is jitted: one compile instead of one per primitive op-by-op.)"""
    params = model.init(jax.random.split(jax.random.key(seed))[0],
                        jnp.zeros((1, *IMAGE_SHAPE)))["params"]

    def loss_fn(p, x, labels):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for batch in batches:
        x = (batch["image"].astype(np.float32) / 255.0 - mean) / std
        loss, grads = value_and_grad(params, x, batch["label"])
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        losses.append(float(loss))
    return params, losses


def random_batches(members, steps, rows=16):
    rng = np.random.default_rng(0)
    return [[{"image": rng.integers(0, 256, (rows, *IMAGE_SHAPE), dtype=np.uint8),
              "label": rng.integers(0, 10, rows).astype(np.int32),
              "index": rng.permutation(1000)[:rows].astype(np.int32)} for _ in range(members)]
            for _ in range(steps)]


@pytest.mark.parametrize("lowering", ["loop", "vmap", "unroll"])
def test_sweep_step_equals_plain_sgd_per_member(lowering):
    """Two members of different seeds (and, in one program, learning rates): each follows its own
    plain SGD (under 'vmap' the learning rate is an array beside the state)."""
    seeds, rates = [3, 11], [0.1, 0.1 if lowering == "loop" else 0.03]  # 'loop': one compile
    cfgs = [Config().override(PLAIN_SGD + [f"train.seed={s}", f"optim.learning_rate={r}"])
            for s, r in zip(seeds, rates)]
    parts = builder.build_members(cfgs, SPEC, steps_per_epoch=10)
    step = make_sweep_step(lowering, parts, ("optim.learning_rate",))
    held, losses = step.pack([p.init_state() for p in parts]), []
    batches = random_batches(len(seeds), 3)
    for per_member in batches:
        held, metrics = step(held, per_member)
        losses.append([float(m["loss"]) for m in metrics])
    for i, (seed, rate, swept) in enumerate(zip(seeds, rates, step.unpack(held))):
        params, reference = sgd_reference(parts[i].model, seed, [b[i] for b in batches], rate)
        np.testing.assert_allclose([l[i] for l in losses], reference, rtol=1e-5)
        assert int(swept.step) == len(batches)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     swept.params, params)


# Every kind of value a 'vmap' program holds as an array, each at 0 (off) in one of the two members
# where 0 turns it off; the second member mixes with both mixup and CutMix (the keyed choice).
ADAM_GRID = {
    "optim.learning_rate": [1e-3, 1e-2], "optim.weight_decay": [0.0, 1e-4], "optim.b1": [0.9, 0.8],
    "optim.b2": [0.999, 0.99], "optim.eps": [1e-8, 1e-6], "model.kwargs.dropout": [0.0, 0.5],
    "model.kwargs.conv_dropout": [0.1, 0.0], "train.label_smoothing": [0.0, 0.1],
    "augment.rotate": [0.0, 10.0], "augment.translate": [2.0, 0.0], "augment.scale": [0.0, 0.1],
    "augment.mixup": [0.0, 0.4], "augment.cutmix": [1.0, 0.5],
}
SGD_GRID = {"optim.learning_rate": [0.1, 0.03], "optim.momentum": [0.9, 0.5],
            "optim.weight_decay": [0.0, 1e-3]}


@pytest.mark.parametrize("grid, base", [(ADAM_GRID, []), (SGD_GRID, ["optim.name=sgd"])],
                         ids=["adam", "sgd"])
def test_one_program_for_many_values_follows_each_members_own_step(grid, base):
    """Members differing in every traceable value, one 'vmap' program: each member's loss,
    accuracy and gradient norm are its own compiled step's to float rounding (1e-6), its
    parameters close by; a dropout rate, warp or mixing alpha of 0 leaves that part out exactly
    as the member's own step does."""
    cfgs = [Config().override(["model.kwargs.features=4,8", "model.kwargs.dense=16",
                               f"train.seed={i}", *base] + [f"{k}={v[i]}" for k, v in grid.items()])
            for i in range(2)]
    parts = builder.build_members(cfgs, SPEC, steps_per_epoch=10)
    step = make_sweep_step("vmap", parts, tuple(grid))
    own = [p.init_state() for p in parts]
    held = step.pack([jax.tree.map(jnp.copy, s) for s in own])
    for per_member in random_batches(2, 2):
        held, metrics = step(held, per_member)
        for i, p in enumerate(parts):
            own[i], mine = p.epoch_steps[0](own[i], per_member[i], p.train_key)
            for name in ("loss", "accuracy", "grad_norm"):
                assert float(metrics[i][name]) == pytest.approx(float(mine[name]), rel=1e-6), \
                    (i, name)
    for swept, mine in zip(step.unpack(held), own):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     swept.params, mine.params)


def test_traced_values_are_the_numbers_the_step_uses():
    cfg = Config().override(["model.kwargs.dropout=0.29", "optim.learning_rate=0.01"])
    values = traced.values_of(cfg, ("model.kwargs.dropout", "optim.learning_rate"))
    assert values["optim.learning_rate"] == np.float32(0.01)
    # dropout travels as its keep probability, rounded once from the double as a constant's is
    keep = values["model.kwargs.dropout"]
    assert keep == np.float32(1.0 - 0.29) != np.float32(1) - np.float32(0.29)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _close(ours, theirs, rel):
    assert len(ours) == len(theirs) and len(ours) > 3
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (a, key)
            else:
                assert a[key] == b[key], (a, key)


# 2 classes: 9 steps an epoch at batch 64; a log line every 4, a checkpoint every 3 steps.
TINY = ["model.kwargs.features=4", "model.kwargs.dense=8", "data.classes=0,1", "train.epochs=2",
        "train.log_every=4", "train.checkpoint_every_steps=3", "train.progress=false"]
GRID = {"model.kwargs.dropout": [0, 0.5], "optim.learning_rate": [3e-3]}


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    """Each grid member's own `cnnjax train` run: its directory, by member name."""
    cfg, runs = Config().override(TINY + ["optim.learning_rate=0.003"]), {}
    for dropout in GRID["model.kwargs.dropout"]:
        run_dir = tmp_path_factory.mktemp("own") / "run"
        train_and_evaluate(cfg.set("model.kwargs.dropout", dropout), run_dir)
        runs[f"dropout={dropout},learning_rate=0.003,seed=0"] = run_dir
    return runs


@pytest.fixture(scope="module")
def vmap_sweep(tmp_path_factory):
    """The grid swept uninterrupted under 'vmap': (summary, directory)."""
    out = tmp_path_factory.mktemp("sweep") / "vmap"
    return run_sweep(Config().override(TINY), [0], out, "vmap", GRID), out


@pytest.mark.parametrize("lowering", ["loop", "vmap"])
def test_grid_members_are_their_own_runs(tmp_path, own_runs, vmap_sweep, lowering):
    """Every member is a run directory that `cnnjax train --config <member>/config.json` would
    write: the same config, and its metrics.jsonl byte for byte under 'loop', within 1e-6 under
    'vmap' (one program, the learning rate and dropout rate as arrays); load_run and cnnjax
    compare read the members."""
    if lowering == "vmap":
        summary, out = vmap_sweep
    else:
        out = tmp_path / "loop"
        summary = run_sweep(Config().override(TINY), [0], out, "loop", GRID)
    assert [m["name"] for m in summary["members"]] == list(own_runs)
    assert summary["traced"] == (list(GRID) if lowering == "vmap" else [])
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["status"] == "finished"
    assert saved["grid"] == [[k, list(v)] for k, v in GRID.items()]
    for name, own in own_runs.items():
        member = out / name
        assert (member / "config.json").read_text() == (own / "config.json").read_text()
        if lowering == "loop":
            assert (member / "metrics.jsonl").read_bytes() == (own / "metrics.jsonl").read_bytes()
        else:
            _close(_records(member / "metrics.jsonl"), _records(own / "metrics.jsonl"), 1e-6)
        for f in ("summary.json", "data_spec.json", "timing.jsonl", "loss.png", "tensorboard"):
            assert (member / f).exists(), f
        ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (member, own))
        assert ours["best_step"] == theirs["best_step"] and ours["steps"] == theirs["steps"]
    assert cnnjax.load_run(out / name).summary["test"] == json.loads(
        (out / name / "summary.json").read_text())["test"]
    page = cnnjax.compare_runs([out], tmp_path / "compare", calibrate=False)
    assert all(name in page.read_text() for name in own_runs)


SEEDS_CFG = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "model.kwargs.dropout=0.3",
             "train.epochs=7", "train.batch_size=128", "train.log_every=7",
             "train.early_stopping_patience=1", "optim.learning_rate=0.1", "train.progress=false"]


def test_seeds_that_stop_early_leave_the_sweep(tmp_path):
    """A seed-only sweep under 'unroll' (one program holding both seeds' steps): with this learning
    rate and patience the seeds stop early at different epochs (5 and 6 of 7), so one leaves the
    compiled stack before the other; each finishes as its run does, and the sweep says who left
    at which step. (Batch 128 runs as two passes on CPU.)"""
    cfg = Config().override(SEEDS_CFG)
    summary = run_sweep(cfg, [2, 3], tmp_path / "sweep", "unroll")
    left = {m["name"]: m for m in summary["left"]}
    for member in summary["members"]:
        own = json.loads((tmp_path / "sweep" / member["name"] / "summary.json").read_text())
        assert member["name"] == f"seed={member['seed']}" and member["status"] == "finished"
        assert own["stopped_early"] and member["epochs_run"] == own["epochs_run"] < cfg.train.epochs
        assert member["best_epoch"] == own["best_epoch"] < own["epochs_run"]
        assert left[member["name"]]["step"] == own["steps"]
        assert "stopped early" in left[member["name"]]["reason"]
    assert sorted(m["epochs_run"] for m in summary["members"]) == [5, 6]
    accs = [m["test"]["accuracy"] for m in summary["members"]]
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert summary["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))


def test_a_diverging_member_leaves_and_the_others_go_on(tmp_path, own_runs):
    """One member's learning rate makes its loss infinite: it leaves at that step with the reason,
    its last checkpoint kept and no summary; the other, in the same 'vmap' program, trains on as
    its own run does. (The members given as value sets, as a search's batch of trials.)"""
    points = [{"optim.learning_rate": 3e-3}, {"optim.learning_rate": 1e9}]
    summary = run_sweep(Config().override(TINY + ["model.kwargs.dropout=0.5"]), [0],
                        tmp_path / "sweep", "vmap", points=points)
    assert summary["points"] == [[["optim.learning_rate", v]] for v in (3e-3, 1e9)]
    healthy, diverged = summary["members"]
    assert healthy["status"] == "finished"
    _close(_records(tmp_path / "sweep" / healthy["name"] / "metrics.jsonl"),
           _records(own_runs["dropout=0.5,learning_rate=0.003,seed=0"] / "metrics.jsonl"), 1e-6)
    assert diverged["status"] == "diverged"
    assert "non-finite gradient norm" in diverged["reason"] or "the loss is" in diverged["reason"]
    assert summary["left"] == [{k: diverged[k] for k in ("name", "status", "reason", "step")}]
    assert f"at step {diverged['step']}" in diverged["reason"]
    member = tmp_path / "sweep" / diverged["name"]
    assert not (member / "summary.json").exists()
    assert all(s < diverged["step"] for s in Checkpointer(member, read_only=True).steps())


@pytest.mark.parametrize("item, needle", [
    ("model.kwargs.features=[4,8]", "model.kwargs.features: cannot vary within one sweep: it "
                                    "changes the model's shapes"),
    ("train.batch_size=[32,64]", "shape of every batch"),
    ("optim.name=[sgd,adam]", "not a JSON list of numbers"),
    ("train.epochs=[1,2]", "epoch by epoch"),
    ("train.seed=[1,2]", "--seeds"),
    ("optim.momentum=[0,0.9]", "applies to optim.name=sgd"),
    ("train.learning_rate=[1]", "unknown config key"),
    ("optim.learning_rate=[1e-3,1e-3]", "repeats a value"),
    ("model.kwargs.dropout=[0,1.5]", "dropout"),
])
def test_a_key_that_changes_the_program_is_refused_before_anything_runs(tmp_path, item, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        run_sweep(Config(), [0], tmp_path / "sweep", "vmap", parse_grid([item]))
    assert not (tmp_path / "sweep").exists()


def test_value_sets_set_the_same_keys_once_each(tmp_path):
    with pytest.raises(ValueError, match="the same keys"):
        run_sweep(Config(), [0], tmp_path / "s", "vmap",
                  points=[{"optim.learning_rate": 1e-3}, {"optim.weight_decay": 0.0}])
    with pytest.raises(ValueError, match="repeat one"):
        run_sweep(Config(), [0], tmp_path / "s", "vmap",
                  points=[{"optim.learning_rate": 1e-3}, {"optim.learning_rate": 1e-3}])
    with pytest.raises(ValueError, match="cannot vary within one sweep"):
        run_sweep(Config(), [0], tmp_path / "s", "vmap", points=[{"train.batch_size": 32}])


def test_momentum_off_and_on_in_one_grid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="0 turns momentum off"):
        run_sweep(Config().set("optim.name", "sgd"), [0], tmp_path / "s", "vmap",
                  {"optim.momentum": [0, 0.9]})


def test_cnnjax_sweep_command(tmp_path, capsys):
    from cnnjax.cli import main
    out = tmp_path / "sw"
    assert main(["sweep", "--seeds", "2", "--seed", "5", "--epochs", "1", "--quiet", "--out",
                 str(out), "--batch-size", "500", "--set", "model.kwargs.features=4",
                 "--set", "model.kwargs.dense=8", "--set", "data.classes=0,1"]) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["seeds"] == [5, 6] and (out / "seed=6" / "metrics.jsonl").exists()
    assert json.loads((out / "seed=5" / "config.json").read_text())["train"]["seed"] == 5
    printed = capsys.readouterr().out
    assert "± " in printed and "seed=6" in printed
    assert main(["sweep", "--seeds", "0", "--out", str(tmp_path / "none")]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert main(["sweep", "--grid", "model.kwargs.features=[4,8]", "--out",
                 str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot vary within one sweep" in err
    assert main(["sweep", "--resume", str(out), "--seeds", "3"]) == 2
    assert "give --resume DIR alone" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(out)]) == 2
    assert "already holds a finished sweep" in capsys.readouterr().err


KILL_GRID = ["--grid", "model.kwargs.dropout=[0,0.5]", "--grid", "optim.learning_rate=[3e-3]"]


def sweep_command(out):
    cmd = [sys.executable, "-m", "cnnjax", "sweep", "--seeds", "1", "--lowering", "vmap",
           "--out", str(out), *KILL_GRID]
    for item in TINY:
        cmd += ["--set", item]
    return cmd


def test_members_at_different_checkpoints_resume_from_the_step_all_saved(tmp_path, vmap_sweep):
    """A kill between two members' saves, made exactly: one member's newest checkpoint removed
    (as if the kill came before it was written). The resume takes every member back to the step
    they all saved, and the logs come out byte for byte as the uninterrupted sweep's."""
    _, whole = vmap_sweep
    out = tmp_path / "partial"
    shutil.copytree(whole, out)
    saved = json.loads((out / "sweep.json").read_text())
    saved["status"] = "training"
    saved["members"] = [{k: m[k] for k in ("name", "values", "seed")} | {"status": "training"}
                        for m in saved["members"]]
    (out / "sweep.json").write_text(json.dumps(saved))
    names = [m["name"] for m in saved["members"]]
    for name in names:  # the sweep not yet finished: no member summary
        (out / name / "summary.json").unlink()
    behind = Checkpointer(out / names[1])
    steps = behind.steps()
    behind.manager.delete(steps[-1])
    behind.close()
    summary = cnnjax.run_sweep(Config().override(TINY), [0], out, "vmap", GRID)
    assert summary["status"] == "finished"
    for name in names:
        assert (out / name / "metrics.jsonl").read_bytes() == \
            (whole / name / "metrics.jsonl").read_bytes(), name


def test_sigterm_checkpoints_every_member_at_one_step_and_the_resume_is_byte_identical(
        tmp_path, vmap_sweep):
    """SIGTERM to a running 'vmap' sweep: every member checkpoints at the same step (with its log
    window not yet written), the command exits 143 naming `cnnjax sweep --resume`, and the resumed
    sweep's members write the bytes of the uninterrupted sweep's."""
    _, whole = vmap_sweep
    out = tmp_path / "stopped"
    proc = subprocess.Popen(sweep_command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        log, deadline = out / "dropout=0,learning_rate=0.003,seed=0" / "metrics.jsonl", \
            time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (
                log.exists() and log.read_text()):
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, (stdout, err)
    assert f"cnnjax sweep --resume {out}" in stdout and "Traceback" not in stdout + err
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["status"] == "preempted"
    names = [m["name"] for m in saved["members"]]
    steps = {name: Checkpointer(out / name, read_only=True).steps()[-1] for name in names}
    assert len(set(steps.values())) == 1, steps
    from cnnjax.cli import main
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    for name in names:
        assert (out / name / "metrics.jsonl").read_bytes() == \
            (whole / name / "metrics.jsonl").read_bytes(), name
