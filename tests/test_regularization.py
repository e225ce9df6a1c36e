"""Dropout, batch norm and augmentation: keyed per example, reproducible, and equal to torch's BN."""

import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import Config, train_and_evaluate
from cnnjax.data.augment import Compose, from_config, random_rotation, warp
from cnnjax.config import AugmentConfig, ModelConfig
from cnnjax.nn.layers import ExampleDropout
from cnnjax.nn.models import build_model


def digit_like(n=4, size=28, seed=0):
    """Bright blobs away from the border, so warps lose no mass over the edge."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, size, size, 1), np.float32)
    img[:, 9:19, 10:18, 0] = rng.uniform(50, 255, (n, 10, 8))
    return jnp.asarray(img)


def test_rotation_by_zero_is_identity():
    images = digit_like()
    out = Compose((random_rotation(0.0),))(images, jax.random.key(0), jnp.arange(4))
    np.testing.assert_allclose(out, images, atol=1e-3)


def test_flip_twice_is_identity_and_flip_mirrors():
    images = digit_like()
    flip = jnp.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    once = jax.vmap(warp, (0, None))(images, flip)
    np.testing.assert_array_equal(once, images[:, :, ::-1, :])
    np.testing.assert_array_equal(jax.vmap(warp, (0, None))(once, flip), images)


def test_rotation_preserves_pixel_mass_up_to_interpolation():
    images = digit_like()
    out = Compose((random_rotation(30.0),))(images, jax.random.key(1), jnp.arange(4))
    assert not np.allclose(out, images)
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=0.02)


def test_augmentation_is_a_function_of_key_and_example_id():
    aug = from_config(AugmentConfig(rotate=10, translate=2, scale=0.1))
    images, ids = digit_like(4), jnp.array([7, 3, 11, 5])
    a = aug(images, jax.random.key(0), ids)
    np.testing.assert_array_equal(a, aug(images, jax.random.key(0), ids))
    assert not np.allclose(a, aug(images, jax.random.key(1), ids))
    # The same example keeps its draw in another batch, at another position.
    swapped = aug(images[::-1], jax.random.key(0), ids[::-1])
    np.testing.assert_array_equal(swapped[::-1], a)
    # Different examples draw differently: identical inputs under different ids differ.
    same = jnp.repeat(images[:1], 2, axis=0)
    b = aug(same, jax.random.key(0), jnp.array([0, 1]))
    assert not np.allclose(b[0], b[1])


def test_bad_augment_config_names_the_field():
    with pytest.raises(ValueError, match="augment.order"):
        from_config(AugmentConfig(order=("rotate", "shear")))
    with pytest.raises(ValueError, match="augment.scale"):
        from_config(AugmentConfig(scale=1.5))


def dropout_apply(x, ids, key, rate=0.5):
    return ExampleDropout(rate).apply({}, x, ids, False, rngs={"dropout": key})


def test_dropout_masks_are_per_example_and_scaled():
    x = jnp.ones((64, 128))
    out = dropout_apply(x, jnp.arange(64), jax.random.key(0))
    assert set(np.unique(np.asarray(out))) == {0.0, 2.0}
    assert abs(float((out == 0).mean()) - 0.5) < 0.02
    # Example 5's mask does not depend on what else is in the batch.
    alone = dropout_apply(x[:1], jnp.array([5]), jax.random.key(0))
    np.testing.assert_array_equal(alone[0], out[5])


def test_dropout_needs_a_key_in_training_and_is_off_in_eval():
    model = build_model(ModelConfig(kwargs=dict(features=(4, 8), dense=(16,), dropout=0.5)), 10)
    x = jnp.ones((2, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply(variables, x, train=True, example_ids=jnp.arange(2))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, train=True, example_ids=jnp.arange(2), rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, example_ids=jnp.arange(2), rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_dropout_masks_identical_on_1_and_8_devices(tmp_path):
    script = textwrap.dedent("""
        import json, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from cnnjax.nn.layers import ExampleDropout
        assert jax.device_count() == 8, jax.devices()
        x = jnp.ones((16, 32)); ids = jnp.arange(100, 116); key = jax.random.key(3)
        f = lambda x, ids: ExampleDropout(0.5).apply({}, x, ids, False, rngs={"dropout": key})
        single = f(x, ids)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("batch"), P("batch")),
                                        out_specs=P("batch")))(x, ids)
        print(json.dumps(bool((np.asarray(single) == np.asarray(sharded)).all())))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True


def test_batch_norm_matches_torch_in_train_and_eval():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 2.0, (8, 6, 6, 4)).astype(np.float32)
    bn_t = torch.nn.BatchNorm2d(4, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn_t.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, 4), dtype=torch.float32))
        bn_t.bias.copy_(torch.tensor(rng.normal(0, 1, 4), dtype=torch.float32))
    bn_j = flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)
    variables = {"params": {"scale": jnp.asarray(bn_t.weight.detach().numpy()),
                            "bias": jnp.asarray(bn_t.bias.detach().numpy())},
                 "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    xt = torch.tensor(x.transpose(0, 3, 1, 2))
    bn_t.train()
    yt = bn_t(xt).detach().numpy().transpose(0, 2, 3, 1)
    yj, updated = bn_j.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(yj, yt, atol=1e-5)
    # Running mean: the same update. Running variance: torch stores the unbiased batch variance,
    # flax the biased one; with n = N*H*W values per channel they differ by n / (n - 1).
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], bn_t.running_mean.numpy(), atol=1e-6)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    batch_var = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * batch_var, rtol=1e-5)
    np.testing.assert_allclose(bn_t.running_var.numpy(), 0.9 + 0.1 * batch_var * n / (n - 1), rtol=1e-5)
    # Eval mode from the same running statistics.
    bn_t.eval()
    variables["batch_stats"] = {"mean": jnp.asarray(bn_t.running_mean.numpy()),
                                "var": jnp.asarray(bn_t.running_var.numpy())}
    yt = bn_t(xt).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(bn_j.apply(variables, jnp.asarray(x), use_running_average=True), yt, atol=1e-5)


ALL_ON = ["model.kwargs.features=8,16", "model.kwargs.dense=32", "train.epochs=2", "train.progress=false",
          "model.kwargs.dropout=0.5", "model.kwargs.batch_norm=true", "augment.rotate=10", "augment.translate=2",
          "augment.scale=0.1"]


def test_all_regularizers_train_reproducibly(tmp_path):
    cfg = Config().override(ALL_ON)
    first = train_and_evaluate(cfg, tmp_path / "a").summary
    train_and_evaluate(cfg, tmp_path / "b")
    a, b = (tmp_path / "a" / "metrics.jsonl").read_bytes(), (tmp_path / "b" / "metrics.jsonl").read_bytes()
    assert a == b
    assert (tmp_path / "a" / "augmentations.png").exists()
    assert first["test"]["accuracy"] > 0.5  # learning under heavy regularization (chance: 0.1)
    # Batch statistics were learned and are used in evaluation.
    from cnnjax import load_run
    run = load_run(tmp_path / "a")
    stats = run.variables["batch_stats"]["bn1"]
    assert not np.allclose(stats["mean"], 0.0) and not np.allclose(stats["var"], 1.0)
    images = np.zeros((3, 28, 28), np.uint8)
    images[1, 10:18, 10:18] = 255
    one = run.logits(images[1:2])
    np.testing.assert_allclose(run.logits(images)[1:2], one, rtol=1e-5, atol=1e-5)
