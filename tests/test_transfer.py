"""Transfer learning: frozen means bit-identical, the optimizer's labels and schedule, class subsets,
and backbones loaded from a cnnjax run's checkpoint."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.training import checkpoint, transfer
from cnnjax.nn import convert
from cnnjax.config import Config, DataConfig
from cnnjax.data.input_pipeline import data_spec, select_classes
from cnnjax.nn.models import SeedCNN
from cnnjax.training.optim import make_optimizer, make_plateau
from fixtures import TinyResNet
from cnnjax.training.builder import build
from cnnjax.training.steps import create_train_state, make_train_step

IMAGE_SHAPE = (28, 28, 1)
# Two stages instead of four: compiling the train step is most of these tests' time.
SmallResNet = functools.partial(TinyResNet, stage_sizes=(1, 1))


def config(**transfer_fields) -> Config:
    cfg = Config()
    for key, value in transfer_fields.items():
        cfg = cfg.set(f"transfer.{key}", value)
    return cfg


def new_state(model, tx, seed=0):
    plateau = make_plateau(Config().optim)
    init = jax.jit(lambda rng: create_train_state(model, tx, plateau, IMAGE_SHAPE, rng))
    return init(jax.random.key(seed))


def batches(n, seed=0, size=16, num_classes=5):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"image": rng.integers(0, 256, (size, *IMAGE_SHAPE), dtype=np.uint8),
               "label": rng.integers(0, num_classes, size).astype(np.int32),
               "index": rng.permutation(4000)[:size].astype(np.int32)}


def variables_of(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def transfer_optimizer(cfg, steps_per_epoch):
    """The run's optimizer with transfer's parameter groups, as the builder makes it."""
    return make_optimizer(cfg.optim, steps_per_epoch, cfg.train.epochs,
                          transfer.parameter_groups(cfg, steps_per_epoch))


def train(model, tx, state, cfg, epoch, n_steps, seed):
    """`n_steps` train steps with the model of `epoch`; returns the state."""
    step = make_train_step(transfer.model_for_epoch(model, cfg.transfer, variables_of(state), epoch), tx,
                           0.1307, 0.3081)
    for batch in batches(n_steps, seed):
        state, metrics = step(state, batch, jax.random.key(1))
        assert bool(metrics["finite"])
    return state


def snapshot(state) -> dict[str, np.ndarray]:
    """Copies, not views: the train step donates (and may overwrite) the state's buffers."""
    leaves = jax.tree_util.tree_flatten_with_path({"params": state.params,
                                                   "batch_stats": state.batch_stats})[0]
    return {convert.path_name(p): np.array(v, copy=True) for p, v in leaves}


def changed(before, after, prefix) -> dict[str, bool]:
    """{path: changed?} for every leaf whose path (without the collection) starts with `prefix`."""
    out = {k: not np.array_equal(before[k], after[k]) for k in before
           if k.split("/", 1)[1].startswith(prefix)}
    assert out, prefix
    return out


# --- freezing ---------------------------------------------------------------------------------

def test_frozen_backbone_is_bit_identical_until_its_unfreezing_epoch():
    """Freeze everything but the head, unfreeze layer2 after epoch 1 (2 steps per epoch)."""
    cfg = config(freeze="backbone", unfreeze="layer2", unfreeze_after_epochs=1)
    model = SmallResNet(num_classes=5)
    tx = transfer_optimizer(cfg, 2)
    state = new_state(model, tx)
    start = snapshot(state)

    state = train(model, tx, state, cfg, epoch=1, n_steps=2, seed=0)
    after_1 = snapshot(state)
    for prefix in ("conv1", "bn1", "layer1", "layer2"):
        assert not any(changed(start, after_1, prefix).values()), prefix  # params and BN stats
    assert all(changed(start, after_1, "fc").values())

    state = train(model, tx, state, cfg, epoch=2, n_steps=2, seed=1)
    after_2 = snapshot(state)
    for prefix in ("conv1", "bn1", "layer1"):
        assert not any(changed(start, after_2, prefix).values()), prefix
    layer2 = changed(after_1, after_2, "layer2")
    assert all(layer2.values()), [k for k, v in layer2.items() if not v]  # incl. running stats
    assert any(k.startswith("batch_stats/layer2") for k in layer2)


def test_freezing_a_middle_stage_lets_the_rest_train():
    """layer1 frozen alone: gradients flow through it (no stop_gradient), but nothing in it moves."""
    cfg = config(freeze="layer1", backbone_lr_scale=0.1)
    model = SmallResNet(num_classes=5)
    tx = transfer_optimizer(cfg, 2)
    state = new_state(model, tx)
    start = snapshot(state)
    after = snapshot(train(model, tx, state, cfg, epoch=1, n_steps=2, seed=0))
    assert not any(changed(start, after, "layer1").values())
    for prefix in ("conv1", "bn1", "layer2", "fc"):  # bn1: scale, bias and running stats
        assert all(changed(start, after, prefix).values()), prefix


def test_a_run_compiles_one_step_per_set_of_frozen_layers():
    cfg = config(freeze="backbone", unfreeze="layer2", unfreeze_after_epochs=2).override(
        ["model.name=resnet_tiny", "model.kwargs.stage_sizes=1,1"])
    parts = build(cfg.set("train.epochs", 4), data_spec(DataConfig()), steps_per_epoch=4)
    steps = [parts.epoch_steps[epoch - 1] for epoch in (1, 2, 3, 4, 1)]
    assert [s is steps[0] for s in steps] == [True, True, False, False, True]
    assert steps[2] is steps[3]
    frozen = [transfer.model_for_epoch(parts.model, cfg.transfer, variables_of(parts.abstract), e).frozen
              for e in (1, 3)]
    assert frozen == [("bn1", "conv1", "layer1", "layer2"), ("bn1", "conv1", "layer1")]


def test_seed_cnn_with_batch_norm_refuses_frozen_bn_layers():
    model = SeedCNN(features=(4, 8), dense=(16,), batch_norm=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
    with pytest.raises(ValueError, match="cannot keep frozen batch norm"):
        transfer.model_for_epoch(model, config(freeze="bn1", head="fc2").transfer, variables, 1)
    assert transfer.model_for_epoch(model, config(freeze="conv1", head="fc2").transfer,
                                    variables, 1) is model


# --- the optimizer ----------------------------------------------------------------------------

PARAMS = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "layer1": {"w": jnp.ones(3)},
          "layer4": {"w": jnp.ones(3)}, "fc": {"kernel": jnp.ones((2, 5)), "bias": jnp.zeros(5)}}


def updates_over(tx, n, params=PARAMS):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    state, out = tx.init(params), []
    for _ in range(n):
        u, state = tx.update(grads, state, params)
        out.append(u)
    return out


def test_labels_scale_and_unfreeze_schedule():
    cfg = config(freeze="conv1,layer4", unfreeze="layer4", unfreeze_after_epochs=1,
                 backbone_lr_scale=0.1)
    assert transfer.param_labels(PARAMS, cfg.transfer) == {
        "conv1": {"kernel": "frozen"}, "layer1": {"w": "backbone"}, "layer4": {"w": "late"},
        "fc": {"kernel": "head", "bias": "head"}}
    ups = updates_over(transfer_optimizer(cfg, 2), 4)
    plain = updates_over(make_optimizer(cfg.optim), 4)
    for u, p in zip(ups, plain):
        np.testing.assert_array_equal(u["conv1"]["kernel"], 0.0)
        np.testing.assert_array_equal(u["fc"]["kernel"], p["fc"]["kernel"])
        np.testing.assert_allclose(u["layer1"]["w"], 0.1 * p["layer1"]["w"], rtol=1e-7)
    np.testing.assert_array_equal(ups[0]["layer4"]["w"], 0.0)
    np.testing.assert_array_equal(ups[1]["layer4"]["w"], 0.0)
    # Step 3 is layer4's first: a fresh Adam (count 1, zero moments), scaled like the backbone.
    np.testing.assert_allclose(ups[2]["layer4"]["w"], 0.1 * plain[0]["layer4"]["w"], rtol=1e-7)
    np.testing.assert_allclose(ups[3]["layer4"]["w"], 0.1 * plain[1]["layer4"]["w"], rtol=1e-6)
    assert transfer.frozen_at(cfg.transfer, PARAMS, 1) == ("conv1", "layer4")
    assert transfer.frozen_at(cfg.transfer, PARAMS, 2) == ("conv1",)


def test_loading_weights_alone_keeps_the_default_optimizer():
    cfg = config(backbone="/some/run")  # read only when the state is made: not here
    parts = build(cfg, data_spec(DataConfig()), steps_per_epoch=10)
    plain = make_optimizer(cfg.optim)
    assert jax.tree.structure(parts.tx.init(PARAMS)) == jax.tree.structure(plain.init(PARAMS))
    jax.tree.map(np.testing.assert_array_equal, updates_over(parts.tx, 3), updates_over(plain, 3))


@pytest.mark.parametrize("fields, message", [
    ({"freeze": "layer9"}, "'layer9' names no parameter"),
    ({"freeze": "fc"}, "overlaps the new head"),
    ({"freeze": "conv1", "unfreeze": "layer1", "unfreeze_after_epochs": 1}, "'layer1' is not frozen"),
    ({"freeze": "layer1"}, None),
    ({"freeze": "backbone", "unfreeze": "layer4"}, "go together"),
    ({"freeze": "layer4", "unfreeze": "layer4/w", "unfreeze_after_epochs": 2}, "part of the frozen"),
    ({"backbone_lr_scale": 0.0}, "must be positive"),
])
def test_bad_transfer_settings_are_named(fields, message):
    cfg = config(**fields)
    tx = transfer_optimizer(cfg, 10)
    if message is None:
        tx.init(PARAMS)
        return
    with pytest.raises(ValueError, match=message):
        tx.init(PARAMS)


# --- class subsets ----------------------------------------------------------------------------

def test_select_classes_keeps_and_renumbers_in_the_given_order():
    images = np.arange(8)[:, None]
    labels = np.array([0, 5, 9, 5, 7, 1, 9, 6], np.int32)
    x, y = select_classes(images, labels, (9, 5, 6))
    np.testing.assert_array_equal(x[:, 0], [1, 2, 3, 6, 7])
    np.testing.assert_array_equal(y, [1, 0, 1, 0, 2])
    assert y.dtype == np.int32
    assert data_spec(DataConfig(classes=(5, 6, 7, 8, 9))).num_classes == 5
    with pytest.raises(ValueError, match="distinct labels"):
        data_spec(DataConfig(classes=(1, 1)))
    with pytest.raises(ValueError, match="distinct labels"):
        data_spec(DataConfig(classes=(10,)))


# --- backbones from cnnjax runs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    """A run directory as `cnnjax train` leaves it, of a 5-class ResNet whose optimizer is a
    multi_transform (so its optimizer state is not the new run's)."""
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    model = SmallResNet(num_classes=5)
    state = new_state(model, transfer_optimizer(config(freeze="conv1"), 2), seed=3)
    ckpt = checkpoint.Checkpointer(run_dir, async_save=False)
    ckpt.save(7, state, {"best": {"epoch": 1, "step": 7, "val_loss": 0.5}}, {"val_loss": 0.5})
    ckpt.close()
    (run_dir / "summary.json").write_text(json.dumps({"best_step": 7}))
    return run_dir, snapshot(state)


def test_backbone_from_a_run_gets_a_new_head(backbone_run):
    run_dir, trained = backbone_run
    cfg = config(backbone=str(run_dir))
    model = SmallResNet(num_classes=3)
    fresh = new_state(model, make_optimizer(cfg.optim), seed=9)
    head = np.array(fresh.params["fc"]["kernel"], copy=True)
    loaded = snapshot(transfer.initialize(fresh, cfg, model))
    assert loaded["params/fc/kernel"].shape == (16, 3)
    np.testing.assert_array_equal(loaded["params/fc/kernel"], head)
    for key, value in loaded.items():
        if "/fc/" not in key:
            np.testing.assert_array_equal(value, trained[key], err_msg=key)


def test_backbone_of_another_architecture_is_refused_with_every_path(backbone_run):
    run_dir, _ = backbone_run
    model = SmallResNet(num_classes=3, stage_sizes=(1, 2))
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
    with pytest.raises(ValueError) as err:
        transfer.load_backbone(run_dir, template)
    message = str(err.value)
    assert "params/layer2/1/conv1/kernel: missing in backbone, model expects (3, 3, 16, 16)" in message
    assert "batch_stats/layer2/1/bn2/var: missing in backbone" in message
    with pytest.raises(FileNotFoundError, match="not a cnnjax run directory"):
        transfer.load_backbone(run_dir.parent, template)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        transfer.run_variables(run_dir, step=3)


def test_cnnjax_train_fine_tunes_a_frozen_backbone_from_an_earlier_run(tmp_path):
    """The whole path through `train_and_evaluate`: pretrain on digits 0-2, then train a new head on
    5-7 with the backbone frozen; the backbone and its BN statistics come back bit-identical. (The
    two-stage ResNet of this module: every stage of the backbone frozen is the same code path.)"""
    import numpy as np
    from cnnjax import Config, load_run, train_and_evaluate
    from cnnjax.data.input_pipeline import load_split
    base = ["model.name=resnet_tiny", "model.kwargs.stem=small", "model.kwargs.stage_sizes=1,1",
            "train.epochs=1", "train.progress=false", "train.batch_size=128"]
    train_and_evaluate(Config().override(base + ["data.classes=0,1,2"]), tmp_path / "pre")
    summary = train_and_evaluate(Config().override(base + [
        "data.classes=5,6,7", f"transfer.backbone={tmp_path / 'pre'}", "transfer.freeze=backbone"]),
        tmp_path / "post").summary
    assert summary["test"]["count"] == int(np.isin(load_split("mnist5k", "test")[1], [5, 6, 7]).sum())
    pre, post = load_run(tmp_path / "pre").variables, load_run(tmp_path / "post").variables
    for collection in ("params", "batch_stats"):
        for name in pre[collection]:
            if name == "fc":
                continue
            for a, b in zip(jax.tree.leaves(pre[collection][name]), jax.tree.leaves(post[collection][name])):
                np.testing.assert_array_equal(a, b)
    assert not np.array_equal(pre["params"]["fc"]["kernel"], post["params"]["fc"]["kernel"])
