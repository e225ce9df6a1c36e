"""Bring your own model, data and loss: import paths through the CLI and a reload in a fresh
process, the call contract's errors before anything is created, losses against hand
computations, mixup/CutMix keyed per example, bfloat16 against float32."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnnjax
from cnnjax.cli import main

USER_MODULE = textwrap.dedent('''
    """A researcher's own code: nothing of it is in cnnjax."""
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    import optax
    from sklearn.datasets import load_digits


    class TinyNet(nn.Module):
        num_classes: int
        width: int = 8

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Conv(self.width, (3, 3))(x))
            x = nn.Dropout(0.1, deterministic=not train)(x)
            return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


    class NoTrainFlag(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


    class WrongOutput(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))


    def squared_hinge(logits, labels):
        margins = 1.0 - (2.0 * jnp.eye(logits.shape[-1])[labels] - 1.0) * logits
        return jnp.sum(jnp.maximum(margins, 0.0) ** 2, axis=-1)


    def digits():
        d = load_digits()
        images = (d.images * 255 / 16).round().astype(np.uint8)  # (1797, 8, 8), 10 classes
        return {"train": (images[:1400], d.target[:1400]), "test": (images[1400:], d.target[1400:])}
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermods.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _cli(run_dir, *sets):
    args = ["train", "--run-dir", str(run_dir), "--quiet", "--epochs", "2", "--batch-size", "50"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def test_import_path_model_data_and_loss_train_and_reload_in_a_fresh_process(user_module, tmp_path):
    run_dir = tmp_path / "run"
    assert _cli(run_dir, "model.name=usermods:TinyNet", 'model.kwargs={"width": 6}',
                "data.dataset=usermods:digits", "train.loss=usermods:squared_hinge") == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["name"] == "usermods:TinyNet" and saved["model"]["kwargs"] == {"width": 6}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["count"] == 397 and summary["num_params"] == 1 * 9 * 6 + 6 + 6 * 10 + 10
    env = {**os.environ, "PYTHONPATH": str(user_module)}
    out = subprocess.run([sys.executable, "-m", "cnnjax", "eval", "--run", str(run_dir)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["count"] == 397 and result["accuracy"] == summary["test"]["accuracy"]
    # the eval loss is the run's own loss function, recomputed here by hand from its logits
    run = cnnjax.load_run(run_dir)
    from usermods import digits, squared_hinge
    images, labels = digits()["test"]
    logits = run.logits(images)
    assert result["loss"] == pytest.approx(float(np.mean(squared_hinge(logits, labels))), rel=1e-5)
    # without the module on the path: one line naming the import, no traceback
    env.pop("PYTHONPATH")
    out = subprocess.run([sys.executable, "-m", "cnnjax", "eval", "--run", str(run_dir)],
                         capture_output=True, text=True, env=env, cwd=str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "there is no module 'usermods'" in out.stderr and "PYTHONPATH" in out.stderr


@pytest.mark.parametrize("name, message", [
    ("usermods:NoTrainFlag", "__call__(self, x, train: bool = False)"),
    ("usermods:WrongOutput", "expected logits of shape (1, 10)"),
    ("usermods:Missing", "has no 'Missing'"),
    ("nosuchpkg.mod:Net", "there is no module 'nosuchpkg'"),
    ("my_net", "unknown model.name 'my_net'"),
])
def test_a_model_that_does_not_fit_is_refused_before_the_run_directory(user_module, tmp_path,
                                                                       capsys, name, message):
    run_dir = tmp_path / "bad"
    assert _cli(run_dir, f"model.name={name}") == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_registered_model_and_loss_from_python(tmp_path):
    import flax.linen as nn

    @cnnjax.register_model("test_linear")
    class Linear(nn.Module):  # no example_ids, no dropout rng: still trains
        num_classes: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

    cnnjax.register_loss("test_ce_sum", lambda logits, labels: 2.0 * cnnjax.cross_entropy(logits, labels))
    cfg = cnnjax.Config().override(["model.name=test_linear", "train.loss=test_ce_sum",
                                    "train.epochs=1", "train.progress=false"])
    result = cnnjax.train_and_evaluate(cfg, tmp_path / "lin")
    assert result.summary["num_params"] == 28 * 28 * 10 + 10
    run = cnnjax.load_run(tmp_path / "lin")
    data = cnnjax.load_data(cfg.data, 0)
    logits = run.logits(data.test[0])
    by_hand = 2.0 * optax.softmax_cross_entropy_with_integer_labels(logits, data.test[1]).mean()
    assert result.summary["test"]["loss"] == pytest.approx(float(by_hand), rel=1e-5)


def test_label_smoothing_matches_the_formula_and_bad_losses_are_refused():
    from cnnjax.training.losses import make_losses

    tc = cnnjax.TrainConfig(label_smoothing=0.1)
    train, evaluate = make_losses(tc, 4)
    logits = jnp.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    labels = jnp.array([0, 3])
    logp = jax.nn.log_softmax(logits)
    targets = np.full((2, 4), 0.1 / 4) + 0.9 * np.eye(4)[[0, 3]]
    np.testing.assert_allclose(train(logits, labels), -(targets * logp).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(evaluate(logits, labels), -logp[[0, 1], [0, 3]], rtol=1e-6)
    cnnjax.register_loss("test_scalar", lambda logits, labels: jnp.mean(logits))
    with pytest.raises(ValueError, match="one loss per example"):
        make_losses(cnnjax.TrainConfig(loss="test_scalar"), 4)
    with pytest.raises(ValueError, match="applies to cross_entropy"):
        make_losses(cnnjax.TrainConfig(loss="test_scalar", label_smoothing=0.1), 4)
    with pytest.raises(ValueError, match="train.monitor"):
        cnnjax.TrainConfig(monitor="val_f1")


def test_early_stopping_can_watch_validation_accuracy():
    """A rising loss with rising accuracy: watching accuracy, every epoch improves, and the best
    so far holds the accuracy itself under its own name."""
    cfg = cnnjax.Config().override(["train.monitor=val_accuracy", "model.kwargs.features=4,8",
                                    "model.kwargs.dense=16", "train.early_stopping_patience=1"])
    parts = cnnjax.build(cfg, cnnjax.dataset_spec("mnist5k"), steps_per_epoch=10)
    state, loop = parts.init_state(jax.random.key(0)), cnnjax.LoopState(best=cnnjax.Best("val_accuracy"))
    improved = []
    for loss, acc in [(0.5, 0.80), (0.6, 0.85), (0.7, 0.90), (0.4, 0.90), (0.3, 0.89)]:
        state, loop, record = cnnjax.close_epoch(parts, state, loop, {"loss": loss, "accuracy": acc},
                                                 [(0.1, 0.9)])
        improved.append(record["improved"])
    # a tie is no improvement; the second epoch without one (patience 1) ends the run
    assert improved == [True, True, True, False, False] and loop.stopped_early
    assert (loop.best.epoch, loop.best.value) == (3, 0.90)
    assert loop.best.to_json() == {"epoch": 3, "step": 0, "val_accuracy": 0.90}


def test_mixing_is_keyed_per_example_not_per_position():
    from cnnjax.data.mix import Mixing, cutmix_one

    mixing = Mixing(mixup=0.4, cutmix=1.0)
    key = jax.random.key(3)
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
    partners = jnp.roll(x, 1, axis=0)
    ids = jnp.arange(100, 106)
    mixed, lam = mixing(x, partners, ids, key)
    order = jnp.array([4, 2, 0, 5, 1, 3])
    mixed_p, lam_p = mixing(x[order], partners[order], ids[order], key)
    np.testing.assert_array_equal(mixed_p, mixed[order])
    np.testing.assert_array_equal(lam_p, lam[order])
    assert bool(jnp.all((lam >= 0) & (lam <= 1))) and len(set(np.asarray(lam).round(6))) == 6
    # every mixed pixel is lam-weighted (mixup) or taken whole from one image (cutmix)
    for i in range(6):
        m, a, b, l = np.asarray(mixed[i]), np.asarray(x[i]), np.asarray(partners[i]), float(lam[i])
        is_mixup = np.allclose(m, l * a + (1 - l) * b, atol=1e-6)
        from_a = np.isclose(m, a)
        is_cutmix = bool(np.all(from_a | np.isclose(m, b))) and abs(from_a.mean() - l) < 1e-6
        assert is_mixup or is_cutmix, i
    # CutMix's box has the area it reports
    img, box_lam = cutmix_one(jnp.zeros((10, 10, 1)), jnp.ones((10, 10, 1)), jnp.float32(0.64),
                              jax.random.key(1))
    assert float(img.mean()) == pytest.approx(1 - float(box_lam))


# That mixing does not depend on the pass split: tests/test_steps.py, whose sharded test runs the
# mixed step as one pass and as 2 devices x 4 passes.


def test_bfloat16_training_stays_close_to_float32(tmp_path):
    base = ["model.kwargs.features=8,16", "model.kwargs.dense=32", "train.epochs=1", "train.progress=false",
            "train.log_every=5"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = cnnjax.Config().override(base + [f"train.dtype={dtype}"])
        runs[dtype] = cnnjax.train_and_evaluate(cfg, tmp_path / dtype)
    steps = {d: [r for r in cnnjax.read_jsonl(tmp_path / d / "metrics.jsonl") if r["kind"] == "step"]
             for d in runs}
    # the first windows' mean losses within 2% (bf16 keeps 8 bits of mantissa), then both learn
    for a, b in zip(steps["float32"][:4], steps["bfloat16"][:4]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), (a["step"], a["loss"], b["loss"])
    # after the epoch (measured: val loss 1.108 f32, 1.230 bf16; test accuracy 0.710, 0.646)
    f32, bf16 = runs["float32"].summary, runs["bfloat16"].summary
    assert bf16["val"]["loss"] == pytest.approx(f32["val"]["loss"], rel=0.2)
    assert bf16["test"]["accuracy"] > 0.5 and abs(bf16["test"]["accuracy"] - f32["test"]["accuracy"]) < 0.15


def _rgb_dataset(n_train=640, n_test=160, seed=0):
    """4 classes of 32x32 colour images: class k is brighter in channel k % 3, and k // 3 flips
    a bright half; learnable in an epoch, by a model that sees colour."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 120, (n, 32, 32, 3))
        for i, k in enumerate(labels):
            images[i, :, :, k % 3] += 100
            if k // 3:
                images[i, :16] += 30
        return images.astype(np.uint8), labels
    return {"train": split(n_train), "test": split(n_test)}


# The SeedCNN on 32x32x3 images: tests/test_cifar.py trains it on CIFAR-format files.
@pytest.mark.parametrize("model", [["model.name=resnet_tiny", "model.kwargs.stem=small",
                                    "model.kwargs.stage_sizes=1,1"]])
def test_a_three_channel_32px_dataset_of_arrays_trains(tmp_path, model):
    cnnjax.register_dataset("test_rgb32", _rgb_dataset())
    cfg = cnnjax.Config().override(["data.dataset=test_rgb32", "train.epochs=1",
                                    "train.batch_size=32", "train.progress=false", *model])
    result = cnnjax.train_and_evaluate(cfg, tmp_path / "rgb")
    assert result.summary["test"]["count"] == 160 and result.summary["test"]["accuracy"] > 0.5
    spec = json.loads((tmp_path / "rgb" / "data_spec.json").read_text())["spec"]
    assert spec["image_shape"] == [32, 32, 3] and spec["num_classes"] == 4
    train_images = _rgb_dataset()["train"][0]
    np.testing.assert_allclose(spec["mean"], train_images.mean(axis=(0, 1, 2)) / 255, rtol=1e-5)
    run = cnnjax.load_run(tmp_path / "rgb")
    test_images, test_labels = _rgb_dataset()["test"]
    assert np.mean(run.predict(test_images) == test_labels) == result.summary["test"]["accuracy"]
    with pytest.raises(ValueError, match="32, 32, 3"):
        run.predict(np.zeros((2, 28, 28), np.uint8))
