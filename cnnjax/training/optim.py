"""The optimizer: optax pieces composed from `OptimConfig`; by default the seed's torch.optim.Adam.

`optim.name` picks the update rule, each the torch optimizer it reproduces (tests/test_optim.py):
- `torch_adam` (default): torch.optim.Adam(lr, weight_decay, amsgrad). It differs from optax's stock
  transforms twice: weight decay is coupled L2 (decay * param added to the gradient before the
  moments), which is `optax.add_decayed_weights` placed before the Adam scaling, not `optax.adamw`;
  and AMSGrad keeps the running max of the raw second moment and bias-corrects after the max, while
  `optax.scale_by_amsgrad` takes the max of the bias-corrected moment; the two drift apart within a
  few steps, hence `scale_by_torch_adam` below.
- `adam`: `optax.adam` after coupled decay: torch.optim.Adam without AMSGrad (`optim.amsgrad` is
  torch_adam's alone).
- `adamw`: `optax.adamw`: torch.optim.AdamW, decay decoupled and multiplied by the learning rate.
- `sgd`: coupled decay then `optax.sgd(momentum, nesterov)`: torch.optim.SGD with dampening 0
  (optax's trace starts from zero, so its first step equals torch's buffer = gradient).

`optim.schedule` sets the learning rate. `plateau` (default) is the constant rate scaled on
validation-loss plateaus by `optax.contrib.reduce_on_plateau`, a separate transform whose state the
loop updates once per epoch (torch's scheduler.step(val_loss)); the train step multiplies its updates
by that state's `scale`. The others are optax schedules of the step count over the run's
epochs x steps_per_epoch steps, torch's schedulers stepped after every optimizer step:
`constant`; `cosine`, CosineAnnealingLR(T_max=steps, eta_min=min_lr); `warmup_cosine`, a linear
rise from 0 over `warmup_steps` then cosine to min_lr (LinearLR then CosineAnnealingLR under
SequentialLR); `onecycle`, OneCycleLR(max_lr=learning_rate) with torch's defaults (cosine, 30% rise
unless `warmup_steps`, div_factor 25, final_div_factor 1e4; learning rate only, no momentum cycle).
optax's own `cosine_onecycle_schedule` ends each phase one step later than torch, so `onecycle` is
`optax.piecewise_interpolate_schedule` at torch's phase ends.

`optim.clip_norm` clips the raw gradient's global norm first (torch.nn.utils.clip_grad_norm_ before
optimizer.step(), which divides by norm + 1e-6 where optax divides by the norm: 1e-6 relative).
`optim.ema_decay` keeps an exponential moving average of the parameters in the optimizer state
(`track_params_ema`, read with `ema_params`), so checkpoints hold it and resume restores it.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from cnnjax import imports
from cnnjax.config import OptimConfig

# torch.optim.lr_scheduler.OneCycleLR's defaults.
ONECYCLE_PCT_START, ONECYCLE_DIV_FACTOR, ONECYCLE_FINAL_DIV_FACTOR = 0.3, 25.0, 1e4


def concrete(value) -> bool:
    """Whether a hyperparameter is a number. In a program shared by several configs (a
    `cnnjax sweep` grid) it is an array instead, checked as a number per config beforehand:
    the eager checks below look at numbers only."""
    return isinstance(value, (int, float))


class ScaleByTorchAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates  # running max of the raw second moment; unused (empty) without AMSGrad


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        amsgrad: bool = False) -> optax.GradientTransformation:
    """Adam's direction exactly as torch computes it: m_hat / (sqrt(max(v)) / sqrt(1 - b2^t) + eps)."""
    for name, beta in (("b1", b1), ("b2", b2)):
        if concrete(beta) and not 0.0 <= beta < 1.0:
            raise ValueError(f"scale_by_torch_adam: {name} must be in [0, 1), got {beta}.")
    if concrete(eps) and eps < 0:
        raise ValueError(f"scale_by_torch_adam: eps must be non-negative, got {eps}.")

    def init_fn(params):
        # Separate buffers for each moment: the train step donates the state, and XLA refuses to
        # donate one buffer twice.
        zeros = lambda: otu.tree_zeros_like(params)
        return ScaleByTorchAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                                     nu_max=zeros() if amsgrad else ())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = otu.tree_update_moment(updates, state.mu, b1, 1)
        nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else ()
        t = count.astype(jnp.float32)
        bc1 = 1.0 - b1 ** t
        sqrt_bc2 = jnp.sqrt(1.0 - b2 ** t)
        second = nu_max if amsgrad else nu
        new_updates = jax.tree.map(lambda m, v: (m / bc1) / (jnp.sqrt(v) / sqrt_bc2 + eps), mu, second)
        return new_updates, ScaleByTorchAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


# Name -> factory(cfg: OptimConfig, total_steps: int | None) -> a float or an optax schedule of
# the step count. `total_steps` is the run's epochs x steps per epoch (None where the caller
# builds an optimizer without a run); a schedule that spans the run raises without it.
SCHEDULES = imports.Registry("schedule", "optim.schedule")
register_schedule = SCHEDULES.register


def _no_warmup(cfg: OptimConfig) -> None:
    if cfg.warmup_steps:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} applies to warmup_cosine and "
                         f"onecycle, not optim.schedule={cfg.schedule}; set optim.warmup_steps=0 "
                         f"or choose one of those schedules.")


def _run_steps(cfg: OptimConfig, total_steps: int | None) -> int:
    if (total_steps or 0) <= 0:
        raise ValueError(f"optim.schedule={cfg.schedule} spans the run: make_optimizer needs its "
                         f"steps_per_epoch and epochs (positive), got {total_steps} steps in all.")
    if cfg.min_lr < 0 or (concrete(cfg.learning_rate) and cfg.min_lr > cfg.learning_rate):
        raise ValueError(f"optim.min_lr={cfg.min_lr} is where optim.schedule={cfg.schedule} ends: "
                         f"use a value in [0, optim.learning_rate={cfg.learning_rate}].")
    return total_steps


@register_schedule("plateau")
def plateau_schedule(cfg: OptimConfig, total_steps: int | None) -> float:
    """The constant rate, which the plateau rule (`make_plateau`) scales once per epoch."""
    _no_warmup(cfg)
    return cfg.learning_rate


@register_schedule("constant")
def constant_schedule(cfg: OptimConfig, total_steps: int | None) -> float:
    _no_warmup(cfg)
    return cfg.learning_rate


@register_schedule("cosine")
def cosine_schedule(cfg: OptimConfig, total_steps: int | None) -> optax.Schedule:
    """CosineAnnealingLR(T_max=steps, eta_min=min_lr)."""
    _no_warmup(cfg)
    total = _run_steps(cfg, total_steps)
    return optax.cosine_decay_schedule(cfg.learning_rate, total, cfg.min_lr / cfg.learning_rate)


@register_schedule("warmup_cosine")
def warmup_cosine_schedule(cfg: OptimConfig, total_steps: int | None) -> optax.Schedule:
    """LinearLR from 0 over warmup_steps, then CosineAnnealingLR to min_lr (SequentialLR)."""
    total = _run_steps(cfg, total_steps)
    if not 0 < cfg.warmup_steps < total:
        raise ValueError(f"optim.schedule=warmup_cosine needs 0 < optim.warmup_steps < the "
                         f"run's {total} steps, got {cfg.warmup_steps}.")
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, total,
                                              cfg.min_lr)


@register_schedule("onecycle")
def onecycle_schedule(cfg: OptimConfig, total_steps: int | None) -> optax.Schedule:
    """OneCycleLR(max_lr=learning_rate) with torch's defaults, at torch's phase ends."""
    total, warmup = _run_steps(cfg, total_steps), cfg.warmup_steps
    # torch's first phase ends (peaks) at step pct_start * total - 1, the second at total - 1.
    peak_step = warmup - 1 if warmup else ONECYCLE_PCT_START * total - 1
    if not 1 <= peak_step < total - 1:
        raise ValueError(f"optim.schedule=onecycle rises over optim.warmup_steps (0: 30% of the "
                         f"run's {total} steps) and then falls: it needs at least 2 steps each, got "
                         f"a rise of {peak_step + 1:g} steps; lengthen the run or set "
                         f"optim.warmup_steps in [2, {total - 2}].")
    return optax.piecewise_interpolate_schedule(
        "cosine", cfg.learning_rate / ONECYCLE_DIV_FACTOR,
        {peak_step: ONECYCLE_DIV_FACTOR,
         total - 1: 1.0 / (ONECYCLE_DIV_FACTOR * ONECYCLE_FINAL_DIV_FACTOR)})


def make_schedule(cfg: OptimConfig, steps_per_epoch: int | None = None,
                  epochs: int | None = None) -> float | optax.Schedule:
    """The learning rate by step count, from the schedule `optim.schedule` names: a float for
    `plateau` and `constant`, else an optax schedule over the run's epochs x steps_per_epoch."""
    if concrete(cfg.learning_rate) and cfg.learning_rate <= 0:
        raise ValueError(f"optim.learning_rate must be positive, got {cfg.learning_rate}.")
    factory = SCHEDULES.lookup(cfg.schedule)
    total = steps_per_epoch * epochs if steps_per_epoch and epochs else None
    what = f"optim.schedule {cfg.schedule!r}"
    lr = imports.call(factory, what, cfg, total, expected="a factory(cfg, total_steps) returning "
                      "a learning rate or a function of the step count")
    if not (callable(lr) or isinstance(lr, (int, float, jax.Array))) or isinstance(lr, bool):
        raise ValueError(f"{what} returned {imports.kind(lr)}; a schedule returns a learning "
                         f"rate or a function of the step count.")
    if callable(lr):  # checked abstractly on a step count: nothing is computed
        try:
            out = jax.eval_shape(lr, jax.ShapeDtypeStruct((), jnp.int32))
        except Exception as err:  # the user's function: any failure is a misfit, reported as one
            raise ValueError(f"{what} returned a schedule that fails on a step count (an int32 "
                             f"scalar): {imports.where(err)}{imports.first_line(err)}") from None
        if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.number):
            raise ValueError(f"{what} returned a schedule that gives {_described(out)} for a step "
                             f"count; it must give the learning rate, one number (a scalar).")
    return lr


def _described(out) -> str:
    """'float32[3]' for an abstract array, else what it is."""
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"{out.dtype}{list(out.shape)}"
    return imports.kind(out)


# Name -> factory(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation: the update
# rule with its weight decay and learning rate (a float or a schedule), the part that may differ
# per parameter group (transfer learning builds one per label).
OPTIMIZERS = imports.Registry("optimizer", "optim.name")
register_optimizer = OPTIMIZERS.register


def _not_nesterov(cfg: OptimConfig) -> None:
    if cfg.nesterov:
        raise ValueError(f"optim.nesterov applies to sgd, not optim.name={cfg.name}; set "
                         f"optim.name=sgd or optim.nesterov=false.")


@register_optimizer("torch_adam")
def torch_adam(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay, amsgrad): coupled decay, torch's AMSGrad."""
    _not_nesterov(cfg)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       scale_by_torch_adam(cfg.b1, cfg.b2, cfg.eps, cfg.amsgrad),
                       optax.scale_by_learning_rate(learning_rate))


@register_optimizer("adam")
def adam(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation:
    """torch.optim.Adam without AMSGrad: coupled decay, then optax.adam."""
    _not_nesterov(cfg)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.adam(learning_rate, cfg.b1, cfg.b2, cfg.eps))


@register_optimizer("adamw")
def adamw(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation:
    """torch.optim.AdamW: decoupled decay, multiplied by the learning rate."""
    _not_nesterov(cfg)
    return optax.adamw(learning_rate, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)


@register_optimizer("sgd")
def sgd(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation:
    """torch.optim.SGD (dampening 0): coupled decay, then optax.sgd(momentum, nesterov)."""
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(learning_rate, None if concrete(cfg.momentum) and cfg.momentum == 0
                                 else cfg.momentum, cfg.nesterov))


def make_base_optimizer(cfg: OptimConfig, steps_per_epoch: int | None = None,
                        epochs: int | None = None) -> optax.GradientTransformation:
    """Weight decay, the update rule and the learning rate, by `optim.name` and `optim.schedule`."""
    if concrete(cfg.weight_decay) and cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be non-negative, got {cfg.weight_decay}.")
    lr = make_schedule(cfg, steps_per_epoch, epochs)
    tx = imports.call(OPTIMIZERS.lookup(cfg.name), f"optim.name {cfg.name!r}", cfg, lr,
                      expected="a factory(cfg, learning_rate) returning an "
                               "optax.GradientTransformation")
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(f"optim.name {cfg.name!r} returned {imports.kind(tx)}; an optimizer "
                         f"factory(cfg, learning_rate) returns an optax.GradientTransformation "
                         f"(optax.adam(learning_rate), optax.chain(...)).")
    return tx


def wrap_optimizer(cfg: OptimConfig, tx: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
    """Gradient clipping before `tx` and the parameter EMA after it: both over the whole parameter
    tree, so they wrap transfer learning's per-label optimizers from outside. `tx` itself when
    neither is set (the default's state is the seed's, unchanged)."""
    parts = [tx]
    if cfg.clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.ema_decay is not None:
        parts.append(track_params_ema(cfg.ema_decay))
    return tx if len(parts) == 1 else optax.chain(*parts)


class ParamGroups(NamedTuple):
    """Parameters optimized in groups, as torch's param_groups. `labels` names each parameter's
    group (a tree like the parameters, or a function of them); `scales[group]` multiplies its
    learning rate (0: no update and no optimizer state); a group in `starts` trains from that
    update count on, its optimizer state starting from zero then, as for a group added to a torch
    optimizer at that step."""

    labels: Any
    scales: Mapping[str, float]
    starts: Mapping[str, int]


def make_optimizer(cfg: OptimConfig, steps_per_epoch: int | None = None,
                   epochs: int | None = None, groups: ParamGroups | None = None
                   ) -> optax.GradientTransformation:
    """The run's optimizer; `steps_per_epoch` and `epochs` are needed by per-step schedules only.

    The default: coupled weight decay -> torch-style Adam/AMSGrad -> -learning_rate. With
    `groups`, that rule per group (`optax.multi_transform`); gradient clipping and the parameter
    EMA (`wrap_optimizer`) act once, on the whole tree.
    """
    if groups is None:
        return wrap_optimizer(cfg, make_base_optimizer(cfg, steps_per_epoch, epochs))
    transforms = {}
    for name, scale in groups.scales.items():
        tx = make_base_optimizer(cfg, steps_per_epoch, epochs) if scale else optax.set_to_zero()
        tx = tx if scale in (0.0, 1.0) else optax.chain(tx, optax.scale(scale))
        if name in groups.starts:
            tx = optax.transforms.conditionally_mask(
                tx, functools.partial(operator.le, groups.starts[name]))
        transforms[name] = tx
    return wrap_optimizer(cfg, optax.multi_transform(transforms, groups.labels))


def rate_function(cfg: OptimConfig, steps_per_epoch: int | None = None,
                  epochs: int | None = None):
    """`learning_rate_at` for one run: `(step, plateau_scale) -> float`."""
    return functools.partial(learning_rate_at, cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)


def learning_rate_at(cfg: OptimConfig, step: int, plateau_scale: float = 1.0,
                     steps_per_epoch: int | None = None, epochs: int | None = None) -> float:
    """The learning rate of the update from `step` (`TrainState.step`, updates applied so far):
    the schedule's value there times the plateau rule's scale (1.0 for schedules but `plateau`)."""
    return float(_compiled_schedule(cfg, steps_per_epoch, epochs)(step)) * float(plateau_scale)


_SCHEDULE_CACHE: dict[tuple, Callable] = {}


def _compiled_schedule(cfg: OptimConfig, steps_per_epoch: int | None, epochs: int | None):
    """One compiled call per lookup: an optax schedule run op by op costs milliseconds."""
    key = (repr(cfg), steps_per_epoch, epochs)
    if key not in _SCHEDULE_CACHE:
        lr = make_schedule(cfg, steps_per_epoch, epochs)
        _SCHEDULE_CACHE[key] = jax.jit(lr) if callable(lr) else (lambda step: lr)
    return _SCHEDULE_CACHE[key]


# --- the parameter EMA ----------------------------------------------------------------------------

class ParamsEmaState(NamedTuple):
    count: jax.Array  # updates seen
    ema: optax.Params  # the EMA through the parameters the last update was given (see ema_params)
    weight: jax.Array  # 1 - decay, rounded once from Python's double, as torch's lerp weight is


def track_params_ema(decay: float) -> optax.GradientTransformation:
    """Passes updates through and keeps torch's AveragedModel EMA of the parameters
    (get_ema_multi_avg_fn(decay), update_parameters after every optimizer step): the first step's
    parameters, then ema <- ema + (1 - decay) * (params - ema).

    A transform sees the parameters before the update, and the train step scales the updates after
    the optimizer (the plateau rule), so the parameters after the step are unknown here. The state
    therefore holds the EMA through the previous step's parameters, which is exact whatever the
    scale; `ema_params(opt_state, params)` adds the current ones.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"track_params_ema: decay must be in [0, 1), got {decay}.")

    def init_fn(params):
        return ParamsEmaState(count=jnp.zeros([], jnp.int32), ema=otu.tree_zeros_like(params),
                              weight=jnp.asarray(1.0 - decay, jnp.float32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("track_params_ema needs the parameters: tx.update(grads, state, params).")
        return updates, state._replace(count=optax.safe_increment(state.count),
                                       ema=_ema_with(state, params))

    return optax.GradientTransformation(init_fn, update_fn)


def _ema_with(state: ParamsEmaState, params):
    """The EMA once `params` are averaged in: `params` themselves after at most one update (torch
    copies the first step's parameters; before any step there is nothing else to show)."""
    first = state.count <= 1
    return jax.tree.map(
        lambda e, p: jnp.where(first, p, e + state.weight.astype(e.dtype) * (p - e)),
        state.ema, params)


def ema_params(opt_state: Any, params) -> Any | None:
    """The EMA of the parameters through `params` (the state's current ones), or None when the
    optimizer keeps none (`optim.ema_decay` unset, or an inference state without one)."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEmaState))
              if isinstance(s, ParamsEmaState)]
    if len(states) > 1:
        raise ValueError(f"the optimizer state holds {len(states)} parameter EMAs; build the EMA "
                         f"once, around the whole optimizer (wrap_optimizer).")
    return _ema_with(states[0], params) if states else None


# --- the plateau rule -----------------------------------------------------------------------------

def make_plateau(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """ReduceLROnPlateau(mode='min', threshold_mode='rel') in optax's terms.

    torch improves when loss < best * (1 - threshold): rtol = threshold, atol = 0. torch counts
    `patience` bad epochs before cutting, optax cuts when its counter reaches `patience`, hence +1.
    torch's min_lr is absolute, optax's min_scale relative to the base rate. Under any other
    `optim.schedule` the rule is the same transform with min_scale 1: its state (the train state's
    structure) is unchanged and its scale stays 1.0.
    """
    if not 0 < cfg.plateau_factor < 1:
        raise ValueError(f"optim.plateau_factor must be in (0, 1), got {cfg.plateau_factor}.")
    if cfg.plateau_patience < 0:
        raise ValueError(f"optim.plateau_patience must be >= 0, got {cfg.plateau_patience}.")
    return optax.contrib.reduce_on_plateau(
        factor=cfg.plateau_factor, patience=cfg.plateau_patience + 1, rtol=cfg.plateau_threshold,
        atol=0.0, cooldown=0, accumulation_size=1,
        min_scale=cfg.min_lr / cfg.learning_rate if cfg.schedule == "plateau" else 1.0)


def plateau_step(plateau: optax.GradientTransformationExtraArgs, state, val_loss: float):
    """Feeds one epoch's validation loss to the plateau rule; returns its new state."""
    _, state = plateau.update(updates=(), state=state, value=jnp.asarray(val_loss, jnp.float32))
    return state
