"""Many seeds in one program (cnnjax/sweep.py) against single-seed runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnnjax
from cnnjax.config import Config
from cnnjax.training.sweep import init_states, loop_step, make_sweep_step, run_sweep, unstack
from cnnjax.training.loop import train_and_evaluate

IMAGE_SHAPE = (28, 28, 1)
# Plain SGD without decay or momentum: each seed's step is params - lr * grad, written out below
# with jax.grad alone, independently of cnnjax's train step.
PLAIN_SGD = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "optim.name=sgd",
             "optim.momentum=0", "optim.weight_decay=0", "optim.learning_rate=0.1"]


def sgd_reference(model, seed, batches, lr=0.1, mean=0.5, std=0.25):
    """The seed's parameters after plain SGD on `batches`, and each step's loss: init from the
    seed's init key (split(key(seed))[0]) on one image, the batch-mean cross-entropy."""
    params = model.init(jax.random.split(jax.random.key(seed))[0],
                        jnp.zeros((1, *IMAGE_SHAPE)))["params"]
    losses = []
    for batch in batches:
        x = (batch["image"].astype(np.float32) / 255.0 - mean) / std

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize("lowering", ["loop", "vmap", "unroll"])
def test_sweep_step_equals_plain_sgd_per_seed(lowering):
    spec = cnnjax.DatasetSpec("random", 10, IMAGE_SHAPE, 0.5, 0.25, ("train", "test"), False)
    parts = cnnjax.build(Config().override(PLAIN_SGD), spec, steps_per_epoch=10)
    seeds, steps, batch = [3, 11], 3, 16
    rng = np.random.default_rng(0)
    batches = [[{"image": rng.integers(0, 256, (batch, *IMAGE_SHAPE), dtype=np.uint8),
                 "label": rng.integers(0, 10, batch).astype(np.int32),
                 "index": rng.permutation(1000)[:batch].astype(np.int32)} for _ in seeds]
               for _ in range(steps)]

    state, keys = init_states(parts, seeds)
    sweep_step = (loop_step(parts.epoch_steps[0]) if lowering == "loop"
                  else make_sweep_step(parts.pure_train_step(), lowering))
    (state, keys), sweep_losses = sweep_step.pack(unstack(state, len(seeds)), list(keys)), []
    for per_seed in batches:
        stacked = {k: np.stack([b[k] for b in per_seed]) for k in per_seed[0]}
        state, metrics = sweep_step(state, stacked, keys)
        sweep_losses.append(np.asarray(jax.device_get(metrics)["loss"]))

    for i, (seed, swept) in enumerate(zip(seeds, sweep_step.unpack(state))):
        params, losses = sgd_reference(parts.model, seed, [b[i] for b in batches])
        np.testing.assert_allclose([l[i] for l in sweep_losses], losses, rtol=1e-5)
        assert int(swept.step) == steps
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     swept.params, params)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


SWEEP_CFG = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "model.kwargs.dropout=0.3", "train.epochs=7",
             "train.batch_size=128", "train.log_every=7", "train.early_stopping_patience=1",
             "optim.learning_rate=0.1", "train.progress=false"]
SWEEP_SEEDS = [2, 3]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Each seed's own `cnnjax train` run: (summary, its directory)."""
    cfg, runs = Config().override(SWEEP_CFG), {}
    for seed in SWEEP_SEEDS:
        run_dir = tmp_path_factory.mktemp("single") / f"run{seed}"
        runs[seed] = train_and_evaluate(cfg.set("train.seed", seed), run_dir).summary, run_dir
    return runs


@pytest.mark.parametrize("lowering", ["loop", "unroll"])
def test_sweep_writes_each_seeds_own_run(tmp_path, single_runs, lowering):
    """`cnnjax sweep` against `cnnjax train`: per seed, the same metrics.jsonl records (step and
    epoch lines, early stopping decisions) and the same best-epoch test accuracy. Dropout is on,
    so the seeds' random draws are exercised too. With this learning rate and patience the two seeds
    stop early at different epochs (5 and 6 of 7), so one leaves the sweep (under 'unroll', the
    compiled stack) before the other. Batch 128 runs as two passes on CPU, in both."""
    cfg, seeds = Config().override(SWEEP_CFG), SWEEP_SEEDS
    summary = run_sweep(cfg, seeds, tmp_path / "sweep", lowering)
    assert summary["lowering"] == lowering and summary["grad_passes_per_step"] == 2
    for seed, swept in zip(seeds, summary["per_seed"]):
        single, run_dir = single_runs[seed]
        ours = _records(tmp_path / "sweep" / f"seed_{seed}" / "metrics.jsonl")
        theirs = _records(run_dir / "metrics.jsonl")
        assert len(ours) == len(theirs) and len(ours) > 3
        if lowering == "loop":  # the very same compiled step: the same bytes
            assert ours == theirs
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (seed, a, key)
                else:
                    assert a[key] == b[key], (seed, a, key)
        assert swept["best_epoch"] == single["best_epoch"]
        assert swept["epochs_run"] == single["epochs_run"] < cfg.train.epochs
        assert swept["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"], abs=1.5e-3)
    assert len({p["epochs_run"] for p in summary["per_seed"]}) == 2
    accs = [p["test"]["accuracy"] for p in summary["per_seed"]]
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert summary["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))


def test_sweep_refuses_bad_seeds(tmp_path):
    with pytest.raises(ValueError, match="distinct seeds"):
        run_sweep(Config(), [2, 2], tmp_path / "other")


def test_cnnjax_sweep_command(tmp_path, capsys):
    from cnnjax.cli import main
    out = tmp_path / "sw"
    assert main(["sweep", "--seeds", "2", "--seed", "5", "--epochs", "1", "--quiet", "--out", str(out),
                 "--set", "model.kwargs.features=4,8", "--set", "model.kwargs.dense=16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [5, 6] and (out / "seed_6" / "metrics.jsonl").exists()
    assert json.loads((out / "config.json").read_text())["model"]["kwargs"]["features"] == [4, 8]
    assert "± " in capsys.readouterr().out
    assert main(["sweep", "--seeds", "0", "--out", str(tmp_path / "none")]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
