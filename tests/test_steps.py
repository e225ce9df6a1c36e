"""A train step split into several forward/backward passes is the same step as one pass."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cnnjax import Config, train_and_evaluate
from cnnjax.data.augment import from_config
from cnnjax.config import AugmentConfig, ModelConfig, OptimConfig
from cnnjax.nn.models import build_model
from cnnjax.training.optim import make_optimizer, make_plateau
from cnnjax.data.mix import Mixing
from cnnjax.training.steps import (CPU_MICROBATCH, StepOptions, create_train_state, grad_passes,
                                   make_train_step)


def test_grad_passes_picks_cache_sized_passes_on_cpu():
    assert jax.default_backend() == "cpu"
    assert CPU_MICROBATCH == 64
    # the fewest equal passes of at most 64 rows; one pass when they would be under 16 rows
    cases = {32: 1, 64: 1, 65: 1, 96: 2, 100: 2, 128: 2, 200: 4, 512: 8, 1000: 20, 97: 1, 194: 1}
    assert {rows: grad_passes(rows) for rows in cases} == cases
    assert grad_passes(512, batch_norm=True) == 1  # batch statistics are the whole batch's
    assert grad_passes(128, microbatch=32) == 4
    assert grad_passes(128, microbatch=128, batch_norm=True) == 1


def test_grad_passes_refuses_what_would_change_the_step():
    with pytest.raises(ValueError, match=r"train.microbatch=48 must divide the 128 images .* "
                                         r"\[1, 2, 4, 8, 16, 32, 64, 128\]"):
        grad_passes(128, microbatch=48)
    with pytest.raises(ValueError, match="batch-norm statistics are per batch"):
        grad_passes(128, microbatch=32, batch_norm=True)


def test_batch_norm_with_microbatch_fails_before_the_run_starts(tmp_path):
    cfg = Config().override(["model.kwargs.batch_norm=true", "train.microbatch=16", "train.epochs=1"])
    with pytest.raises(ValueError, match="train.microbatch=16 would split each step"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _setup(batch_size: int, seed: int = 0):
    """A SeedCNN with dropout and augmentation on (per-example draws), its state and a batch."""
    model = build_model(ModelConfig(kwargs=dict(features=(8, 16), dense=(32,), dropout=0.5)), 10)
    tx = make_optimizer(OptimConfig())
    state = create_train_state(model, tx, make_plateau(OptimConfig()), (28, 28, 1),
                               jax.random.key(seed))
    rng = np.random.default_rng(seed)
    batch = {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, batch_size).astype(np.int32),
             "index": rng.permutation(4 * batch_size)[:batch_size].astype(np.int32)}
    return model, tx, state, batch, from_config(AugmentConfig(rotate=10, translate=2))


def _copy(tree):
    """The train step donates its state: each call gets its own copy."""
    return jax.tree.map(lambda x: x.copy(), tree)


def _assert_same_step(a, b, rel=1e-5):
    (state_a, metrics_a), (state_b, metrics_b) = a, b
    assert set(metrics_a) == set(metrics_b)
    for key in metrics_a:
        np.testing.assert_allclose(np.asarray(metrics_a[key], np.float64),
                                   np.asarray(metrics_b[key], np.float64), rtol=rel, err_msg=key)
    assert int(state_a.step) == int(state_b.step) == 1
    for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        # Adam's first step is lr * sign(g) except where g ~ 0 (see test_torch_parity)
        assert np.mean(np.abs(np.asarray(x) - np.asarray(y)) <= 1e-6) >= 0.999


def test_passes_give_the_whole_batch_step_with_dropout_and_augmentation():
    model, tx, state, batch, augment = _setup(64)
    key = jax.random.key(5)
    one = make_train_step(model, tx, 0.5, 0.25, augment, microbatch=64)(_copy(state), batch, key)
    passes = make_train_step(model, tx, 0.5, 0.25, augment, microbatch=16)(_copy(state), batch, key)
    _assert_same_step(passes, one)
    # the pure step with its passes written out in one program, as `cnnjax sweep` compiles it
    pure = jax.jit(make_train_step(model, tx, 0.5, 0.25, augment, microbatch=16, compiled=False))(
        _copy(state), batch, key)
    _assert_same_step(pure, one)


def test_default_step_splits_large_cpu_batches():
    """Batch 128 runs as two passes of 64 by default: bit for bit the step given microbatch=64,
    which sums its passes in another order than the one-pass step (so the bits tell them apart)
    and equals that step up to rounding."""
    model, tx, state, batch, augment = _setup(128, seed=1)
    key = jax.random.key(2)
    default = make_train_step(model, tx, 0.5, 0.25, augment)(_copy(state), batch, key)
    halves = make_train_step(model, tx, 0.5, 0.25, augment, microbatch=64)(_copy(state), batch, key)
    one = make_train_step(model, tx, 0.5, 0.25, augment, microbatch=128)(state, batch, key)
    assert grad_passes(128) == 2
    bits = lambda step: [np.asarray(x).tobytes() for x in jax.tree.leaves(step[0].params)]
    assert bits(default) == bits(halves) and bits(default) != bits(one)
    _assert_same_step(default, one)


SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {tests!r})
    from test_steps import MIXINGS, _setup, _step_record
    from cnnjax.training.steps import make_train_step
    assert jax.device_count() == 2
    model, tx, state, batch, augment = _setup(64, seed=3)
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
    out = {{}}
    for mixed, options in MIXINGS.items():
        two = make_train_step(model, tx, 0.5, 0.25, augment, microbatch=8, options=options)(
            jax.device_put(jax.tree.map(lambda x: x.copy(), state), NamedSharding(sharding.mesh, P())),
            jax.device_put(batch, sharding), jax.random.key(4))
        out[mixed] = {{**_step_record(two), "replicated": all(
            p.sharding.is_fully_replicated for p in jax.tree.leaves(two[0].params))}}
    print(json.dumps(out))
""")
MIXINGS = {"": StepOptions(), "mixed": StepOptions(mixing=Mixing(0.4, 1.0))}


def _step_record(step) -> dict:
    state, metrics = step
    return {"metrics": {k: float(v) for k, v in metrics.items()},
            "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)]}


def test_passes_on_a_batch_sharded_over_two_devices():
    """Each pass takes a share of every device's rows: 2 devices x 4 passes of 8 rows = one step,
    with and without mixup/CutMix (whose partners are rows of the whole, sharded batch). The
    one-device, one-pass reference steps run here, the two-device steps in a subprocess."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    code = SHARDED.format(tests=os.path.dirname(__file__))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    model, tx, state, batch, augment = _setup(64, seed=3)
    ones = {mixed: _step_record(make_train_step(model, tx, 0.5, 0.25, augment, microbatch=64,
                                                options=options)(_copy(state), batch,
                                                                 jax.random.key(4)))
            for mixed, options in MIXINGS.items()}
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    twos = json.loads(stdout.strip().splitlines()[-1])
    for mixed, one in ones.items():  # plain, and with mixup/CutMix keyed per example
        two = twos[mixed]
        for key, value in one["metrics"].items():
            assert two["metrics"][key] == pytest.approx(value, rel=1e-5), (mixed, key)
        for x, y in zip(two["params"], one["params"]):
            assert np.mean(np.abs(np.asarray(x) - np.asarray(y)) <= 1e-6) >= 0.999
        assert two["replicated"]  # parameters stay replicated
    assert ones["mixed"]["metrics"]["loss"] != ones[""]["metrics"]["loss"]


def test_eval_passes_sum_to_the_whole_batch():
    """1,000 rows (with 37 padding rows masked out) run as 4 passes of 250 on CPU; the sums equal
    one forward over the batch, counted in numpy."""
    from cnnjax.training.steps import CPU_EVAL_MICROBATCH, make_eval_step

    model, _, state, _, _ = _setup(8)
    rng = np.random.default_rng(7)
    batch = {"image": rng.integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, 1000).astype(np.int32),
             "mask": np.arange(1000) < 963}
    assert 1000 > CPU_EVAL_MICROBATCH
    out = jax.device_get(make_eval_step(model, 0.5, 0.25, 10)(state, batch))
    logits = np.asarray(model.apply({"params": state.params},
                                    (batch["image"].astype(np.float32) / 255.0 - 0.5) / 0.25),
                        np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    m, y, pred = batch["mask"], batch["label"], logits.argmax(1)
    assert int(out["count"]) == 963
    assert float(out["loss_sum"]) == pytest.approx(-logp[np.arange(1000), y][m].sum(), rel=1e-5)
    assert int(out["correct"]) == int((pred == y)[m].sum())
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (y[m], pred[m]), 1)
    np.testing.assert_array_equal(out["confusion"], confusion)
