"""The optimizers, schedules, clipping and parameter EMA of cnnjax/training/optim.py against PyTorch.

As in tests/test_torch_parity.py, each step's gradient is computed once, by torch, and given to both
optimizers (teacher forcing), so only the optimizers' arithmetic is compared. The parameters stay in
torch's layout: an optimizer does not care how its tree is shaped.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim import lr_scheduler  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from cnnjax.config import Config, OptimConfig  # noqa: E402
from cnnjax.training.optim import (  # noqa: E402
    ema_params, learning_rate_at, make_optimizer, make_plateau, plateau_step, scale_by_torch_adam,
    track_params_ema)

STEPS_PER_EPOCH, EPOCHS = 5, 4  # the 20 steps of every parity run
TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tests/conftest.py


def torch_net() -> nn.Sequential:
    """A small conv net whose gradients drive both optimizers (torch's default init)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


def as_tree(tensors) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in tensors}


def side_by_side(cfg: OptimConfig, torch_optimizer, torch_schedule=None, clip=None, ema_decay=None,
                 steps: int = STEPS_PER_EPOCH * EPOCHS):
    """`steps` updates of cnnjax's `make_optimizer(cfg)` and of torch's, on the same gradients.

    Returns the largest parameter difference after each step, torch's gradient norms (before
    clipping) and, with `ema_decay`, the largest difference of the EMAs (torch's AveragedModel).
    """
    net = torch_net()
    params = jax.tree.map(jnp.asarray, as_tree(net.named_parameters()))
    tx = make_optimizer(cfg, STEPS_PER_EPOCH, EPOCHS)
    opt_state = tx.init(params)
    opt = torch_optimizer(net.parameters())
    schedule = torch_schedule(opt) if torch_schedule else None
    averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)) if ema_decay else None

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(2)
    errors, norms, ema_errors = [], [], []
    for _ in range(steps):
        images = torch.from_numpy(rng.standard_normal((16, 1, 8, 8)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 10, 16))
        opt.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        grads = jax.tree.map(jnp.asarray, {k: p.grad.numpy().copy() for k, p in net.named_parameters()})
        if clip is not None:
            norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), clip)))
        opt.step()
        if schedule is not None:
            schedule.step()
        params, opt_state = update(grads, opt_state, params)
        theirs = as_tree(net.named_parameters())
        errors.append(max(float(np.max(np.abs(np.asarray(params[k]) - theirs[k]))) for k in theirs))
        if averaged is not None:
            averaged.update_parameters(net)
            ours = ema_params(opt_state, params)
            theirs = {k.removeprefix("module."): v
                      for k, v in as_tree(averaged.named_parameters()).items()}
            ema_errors.append(max(float(np.max(np.abs(np.asarray(ours[k]) - theirs[k])))
                                  for k in theirs))
    return errors, norms, ema_errors


PARITY = {
    "sgd_nesterov": (OptimConfig(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True,
                                 weight_decay=1e-4),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                               weight_decay=1e-4)),
    "sgd_no_momentum": (OptimConfig(name="sgd", learning_rate=0.05, momentum=0.0, weight_decay=1e-4),
                        lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-4)),
    "adamw": (OptimConfig(name="adamw", weight_decay=1e-2),
              lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)),
    "adam": (OptimConfig(name="adam", weight_decay=0.0), lambda p: torch.optim.Adam(p, lr=1e-3)),
    "adam_coupled_decay": (OptimConfig(name="adam", weight_decay=1e-3),
                           lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3)),
}


@pytest.mark.parametrize("name", PARITY)
def test_optimizer_matches_torch_for_20_steps(name):
    cfg, torch_optimizer = PARITY[name]
    errors, _, _ = side_by_side(cfg, torch_optimizer)
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("name", ["sgd_momentum", "torch_adam"])
def test_clipping_matches_clip_grad_norm(name):
    """Clipping at 0.6: the gradient norms here run from about 0.45 to 1.2, so most steps are
    clipped and some are not."""
    if name == "sgd_momentum":
        cfg = OptimConfig(name="sgd", learning_rate=0.05, momentum=0.9, clip_norm=0.6)
        torch_optimizer = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-5)
    else:
        cfg = OptimConfig(clip_norm=0.6)
        torch_optimizer = lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-5, amsgrad=True)
    errors, norms, _ = side_by_side(cfg, torch_optimizer, clip=0.6)
    assert sum(n > 0.6 for n in norms) >= 10 and any(n < 0.6 for n in norms), norms
    assert max(errors) <= TOLERANCE, errors


def test_schedules_drive_the_optimizer_step_by_step():
    """SGD under cosine and AdamW under warmup-cosine, against torch's schedulers stepped after
    every optimizer step: the schedule's count is the optimizer's."""
    cfg = OptimConfig(name="sgd", learning_rate=0.05, momentum=0.9, schedule="cosine", min_lr=1e-3)
    errors, _, _ = side_by_side(cfg, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                               weight_decay=1e-5),
                                lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-3))
    assert max(errors) <= TOLERANCE, errors
    cfg = OptimConfig(name="adamw", learning_rate=1e-2, schedule="warmup_cosine", warmup_steps=6)
    errors, _, _ = side_by_side(cfg, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-5),
                                lambda o: torch_warmup_cosine(o, 6, 20, 1e-6))
    assert max(errors) <= TOLERANCE, errors


def test_ema_matches_averaged_model():
    cfg = OptimConfig(name="sgd", learning_rate=0.05, momentum=0.9, ema_decay=0.8)
    errors, _, ema_errors = side_by_side(
        cfg, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-5), ema_decay=0.8)
    assert max(errors) <= TOLERANCE and max(ema_errors) <= TOLERANCE, (errors, ema_errors)


# --- learning-rate schedules ----------------------------------------------------------------------

def torch_warmup_cosine(opt, warmup: int, total: int, eta_min: float):
    """LinearLR then CosineAnnealingLR. LinearLR cannot start at 0 (start_factor > 0), ours does:
    1e-9 of the peak apart at step 0, less after."""
    return lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=1e-9, end_factor=1.0, total_iters=warmup),
              lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=eta_min)],
        milestones=[warmup])


def torch_lrs(make_schedule, lr: float, steps: int) -> list[float]:
    """The learning rate each of `steps` optimizer steps uses, the scheduler stepped after each."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = make_schedule(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


LR, SPE, EP = 0.1, 10, 4  # 40 steps
TOTAL = SPE * EP
SCHEDULES = {
    "cosine": (dict(schedule="cosine", min_lr=1e-4),
               lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL, eta_min=1e-4)),
    "warmup_cosine": (dict(schedule="warmup_cosine", warmup_steps=7, min_lr=1e-4),
                      lambda o: torch_warmup_cosine(o, 7, TOTAL, 1e-4)),
    "onecycle": (dict(schedule="onecycle"),
                 lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=TOTAL,
                                                   cycle_momentum=False)),
    "onecycle_rise_15": (dict(schedule="onecycle", warmup_steps=15),
                         lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=TOTAL,
                                                           pct_start=15 / TOTAL,
                                                           cycle_momentum=False)),
    "constant": (dict(schedule="constant"), lambda o: lr_scheduler.ConstantLR(o, factor=1.0)),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_learning_rates_equal_torch_step_by_step(name):
    """Within 1e-6 of the peak rate: float32 rounding (torch schedules in float64)."""
    fields, make_torch = SCHEDULES[name]
    cfg = OptimConfig(learning_rate=LR, **fields)
    ours = [learning_rate_at(cfg, step, 1.0, SPE, EP) for step in range(TOTAL)]
    theirs = torch_lrs(make_torch, LR, TOTAL)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * LR)
    distinct = len(set(np.round(theirs, 9)))
    assert distinct == 1 if name == "constant" else distinct > TOTAL // 2, distinct


def test_stock_optax_onecycle_does_not_match_torch():
    """Why `onecycle` is a piecewise schedule: optax's own ends each phase a step later."""
    stock = optax.cosine_onecycle_schedule(TOTAL, LR)
    theirs = torch_lrs(lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=TOTAL,
                                                         cycle_momentum=False), LR, TOTAL)
    assert max(abs(float(stock(s)) - t) for s, t in enumerate(theirs)) > 1e-3 * LR


def test_learning_rate_at_plateau_is_scaled():
    cfg = OptimConfig()
    assert learning_rate_at(cfg, 0) == cfg.learning_rate
    assert learning_rate_at(cfg, 500, 0.25) == pytest.approx(cfg.learning_rate * 0.25, rel=1e-7)


def test_plateau_rule_stays_at_one_under_other_schedules():
    """Losses that cut the plateau schedule's rate five times leave the others' scale at 1.0, in a
    state of the same structure (the train state's)."""
    params = {"w": jnp.zeros(3)}
    scales = {}
    for schedule in ("plateau", "cosine"):
        cfg = OptimConfig(schedule=schedule, plateau_patience=0)
        plateau = make_plateau(cfg)
        state = plateau.init(params)
        step = jax.jit(lambda state, loss: plateau_step(plateau, state, loss))
        for _ in range(5):
            state = step(state, 1.0)
        scales[schedule] = (float(state.scale), jax.tree.structure(state))
    assert scales["plateau"][0] == pytest.approx(0.5 ** 4)  # the first epoch sets the best
    assert scales["cosine"] == (1.0, scales["plateau"][1])


def test_default_optimizer_is_the_seed_chain():
    """The default's state and updates are those of the chain cnnjax had before optim.name."""
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    grads = {"w": jnp.full(4, 0.5), "b": jnp.array([1.0, -2.0])}
    seed = optax.chain(optax.add_decayed_weights(1e-5), scale_by_torch_adam(amsgrad=True),
                       optax.scale_by_learning_rate(1e-3))
    for tx in (make_optimizer(OptimConfig()), make_optimizer(OptimConfig(), 10, 3)):
        state = tx.init(params)
        assert jax.tree.structure(state) == jax.tree.structure(seed.init(params))
        ours, _ = tx.update(grads, state, params)
        theirs, _ = seed.update(grads, seed.init(params), params)
        assert all(np.array_equal(ours[k], theirs[k]) for k in params)


# --- the parameter EMA ----------------------------------------------------------------------------

class Tiny(fnn.Module):
    @fnn.compact
    def __call__(self, x, train: bool = False, example_ids=None):
        return fnn.Dense(10)(x.reshape(x.shape[0], -1))


def test_ema_through_the_train_step_by_hand():
    """Through `make_train_step` (state donated) with the plateau scale at 0.5, which the step applies
    after the optimizer: the EMA is of the parameters the step produced, by hand: the first step's
    parameters, then ema = d * ema + (1 - d) * params."""
    from cnnjax.training.steps import create_train_state, make_train_step

    decay = 0.7
    cfg = OptimConfig(name="sgd", learning_rate=0.5, momentum=0.0, ema_decay=decay)
    model, tx, plateau = Tiny(), make_optimizer(cfg), make_plateau(cfg)
    state = create_train_state(model, tx, plateau, (4, 4, 1), jax.random.key(0))
    state = state.replace(plateau_state=state.plateau_state._replace(scale=jnp.asarray(0.5)))
    train_step = make_train_step(model, tx, 0.5, 0.25)
    np.testing.assert_array_equal(ema_params(state.opt_state, state.params)["Dense_0"]["kernel"],
                                  state.params["Dense_0"]["kernel"])
    rng = np.random.default_rng(0)
    by_hand = None
    for _ in range(4):
        batch = {"image": rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8),
                 "label": rng.integers(0, 10, 8).astype(np.int32), "index": np.arange(8, dtype=np.int32)}
        before = np.asarray(state.params["Dense_0"]["kernel"])
        state, _ = train_step(state, batch, jax.random.key(1))
        params = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
        assert np.max(np.abs(params - before)) > 1e-3  # the step moves the parameters
        by_hand = params if by_hand is None else decay * by_hand + (1 - decay) * params
        ours = ema_params(state.opt_state, state.params)["Dense_0"]["kernel"]
        np.testing.assert_allclose(ours, by_hand, rtol=0, atol=1e-6)
    assert np.max(np.abs(by_hand - params)) > 1e-3  # the EMA is not the parameters


def test_transfer_clips_and_averages_the_whole_tree_once():
    """Under transfer learning's per-label optimizers the clipping norm is the whole gradient's (the
    head's update equals the plain optimizer's) and there is one EMA, frozen parameters included."""
    from cnnjax.training import transfer

    cfg = Config().override(["transfer.freeze=conv1", "optim.name=sgd", "optim.momentum=0",
                             "optim.weight_decay=0", "optim.clip_norm=0.1", "optim.ema_decay=0.5"])
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 2))}, "layer1": {"w": jnp.ones(3)},
              "fc": {"kernel": jnp.ones((2, 5)), "bias": jnp.zeros(5)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    labelled = make_optimizer(cfg.optim, 10, cfg.train.epochs, transfer.parameter_groups(cfg, 10))
    plain = make_optimizer(cfg.optim)
    (ours, state), (theirs, _) = (tx.update(grads, tx.init(params), params) for tx in (labelled, plain))
    np.testing.assert_array_equal(ours["fc"]["kernel"], theirs["fc"]["kernel"])
    whole = 0.1 / float(optax.tree.norm(grads))  # SGD: the update is -lr * 0.5 * that clip factor
    np.testing.assert_allclose(ours["fc"]["kernel"], -cfg.optim.learning_rate * 0.5 * whole, rtol=1e-6)
    np.testing.assert_array_equal(ours["conv1"]["kernel"], 0.0)
    new_params = optax.apply_updates(params, ours)
    ema = ema_params(state, new_params)
    jax.tree.map(np.testing.assert_array_equal, ema, new_params)  # the first step: its parameters


def test_no_ema_without_ema_decay():
    params = {"w": jnp.ones(2)}
    assert ema_params(make_optimizer(OptimConfig()).init(params), params) is None
    assert ema_params(None, params) is None


# --- bad values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (["optim.warmup_steps=-1"], r"optim\.warmup_steps"),
    (["optim.momentum=1.0"], r"optim\.momentum=1\.0.*\[0, 1\)"),
    (["optim.momentum=0", "optim.nesterov=true"], r"optim\.nesterov.*optim\.momentum > 0"),
    (["optim.clip_norm=0"], r"optim\.clip_norm.*positive"),
    (["optim.ema_decay=1"], r"optim\.ema_decay=1\.0.*\[0, 1\)"),
])
def test_bad_config_values_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config().override(overrides)


@pytest.mark.parametrize("fields,steps,match", [
    (dict(schedule="cosine"), (None, None), r"optim\.schedule=cosine spans the run.*steps_per_epoch"),
    (dict(schedule="warmup_cosine"), (5, 4), r"0 < optim\.warmup_steps < the run's 20 steps, got 0"),
    (dict(schedule="warmup_cosine", warmup_steps=20), (5, 4), r"optim\.warmup_steps < the run's 20"),
    (dict(schedule="cosine", warmup_steps=3), (5, 4), r"applies to warmup_cosine and onecycle"),
    (dict(schedule="onecycle"), (1, 3), r"onecycle.*lengthen the run"),
    (dict(schedule="cosine", min_lr=1.0), (5, 4), r"optim\.min_lr=1\.0"),
    (dict(name="adam", nesterov=True), (5, 4), r"optim\.nesterov applies to sgd"),
    (dict(learning_rate=0.0), (5, 4), r"optim\.learning_rate must be positive"),
    (dict(name="rmsprop"), (5, 4), r"unknown optim\.name 'rmsprop'; known: adam, adamw, sgd, torch_adam"),
    (dict(schedule="step"), (5, 4),
     r"unknown optim\.schedule 'step'; known: constant, cosine, onecycle, plateau, warmup_cosine"),
    (dict(name="fixtures:nothing"), (5, 4), r"module 'fixtures' has no 'nothing'"),
    (dict(name="fixtures:TinySeedCNN"), (5, 4), r"optim\.name 'fixtures:TinySeedCNN': TypeError"),
])
def test_bad_combinations_are_refused_when_built(fields, steps, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(OptimConfig(**fields), *steps)


def test_ema_needs_parameters():
    tx = track_params_ema(0.9)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.ones(1)}))


def test_new_fields_round_trip_through_config_json():
    cfg = Config().override(["optim.name=sgd", "optim.schedule=warmup_cosine", "optim.warmup_steps=50",
                             "optim.nesterov=true", "optim.clip_norm=1", "optim.ema_decay=0.999"])
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    assert (cfg.optim.clip_norm, cfg.optim.ema_decay, cfg.optim.warmup_steps) == (1.0, 0.999, 50)


def test_optimizers_and_schedules_by_registered_name_or_import_path():
    """A user's optimizer and schedule are reached the way the built-ins are: `register_*` or
    `package.module:factory`, with their own arguments in optim.kwargs; clipping and the EMA wrap
    them as they wrap the built-ins."""
    from cnnjax import register_optimizer, register_schedule

    register_optimizer("test_lion", lambda cfg, lr: optax.lion(lr, **cfg.kwargs))
    register_schedule("test_halved", lambda cfg, total: optax.linear_schedule(
        cfg.learning_rate, cfg.learning_rate / 2, total))
    cfg = OptimConfig(name="test_lion", schedule="test_halved", learning_rate=1e-2,
                      kwargs={"b1": 0.5}, clip_norm=0.5)
    params = {"w": jnp.arange(4.0)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i), params) for i in range(3)]
    theirs_tx = optax.chain(optax.clip_by_global_norm(0.5), optax.lion(
        optax.linear_schedule(1e-2, 5e-3, 12), b1=0.5))
    for tx in (make_optimizer(cfg, 4, 3), make_optimizer(dataclasses.replace(
            cfg, name="fixtures:lion_factory"), 4, 3)):
        ours, theirs = tx.init(params), theirs_tx.init(params)
        for g in grads:
            u, ours = tx.update(g, ours, params)
            v, theirs = theirs_tx.update(g, theirs, params)
            np.testing.assert_array_equal(u["w"], v["w"])
