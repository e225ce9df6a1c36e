"""One way to build a run: a `Config` and its data's spec -> model, optimizer, train state, steps.

`build(cfg, spec, steps_per_epoch)` is the only place in cnnjax that constructs a model, an
optimizer or a train state: `cnnjax train` (the loop's `setup`), `cnnjax sweep` (each member),
`load_run` and everything built on them call it, so a sweep member and a `cnnjax train` run of
the same config get the same optimizer from the same code. Every check that can fail on the
user's input runs here, abstractly (`jax.eval_shape`), before anything compiles.

Transfer learning is an option the build applies: with `cfg.transfer` set (a backbone, frozen or
slower layers) the optimizer is labelled per parameter group, the initial state takes the
backbone's weights and each epoch's step keeps its frozen batch norm in inference mode
(cnnjax/training/transfer.py); a run without it never reaches that module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from cnnjax.config import Config
from cnnjax.data import augment
from cnnjax.data.datasets import DatasetSpec
from cnnjax.data import mix
from cnnjax.nn.models import (MODELS, abstract_variables, accepts_example_ids, build_model,
                              check_model, model_from)
from cnnjax.training.losses import LOSSES, losses_from, make_losses
from cnnjax.training import traced, transfer
from cnnjax.nn.conv import conv_lowerings
from cnnjax.training.optim import (ema_params, make_optimizer, make_plateau, plateau_step,
                                   rate_function)
from cnnjax.training.steps import (StepOptions, TrainState, create_train_state, eval_pass_rows,
                                   grad_passes, make_eval_step, make_train_step)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run with this seed."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    return init_rng, train_rng


def evaluated_state(state: TrainState) -> TrainState:
    """The state evaluation and the best checkpoint's metrics use: with `optim.ema_decay`, the
    EMA of the parameters (batch-norm statistics stay the live ones)."""
    ema = ema_params(state.opt_state, state.params) if state.opt_state is not None else None
    return state if ema is None else state.replace(params=ema)


def evaluate(eval_step: Callable, state: TrainState, batches) -> dict[str, Any]:
    """Loss, accuracy, count and confusion matrix over `batches`: the masked sums of
    `eval_step` (`make_eval_step`) added up, one host sync at the end."""
    totals = None
    for batch in batches:
        out = eval_step(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count,
            "count": int(count), "confusion": totals["confusion"].tolist()}


def check_lengths(cfg: Config) -> None:
    """train.epochs, train.log_every and train.checkpoint_every_steps, before anything is built."""
    tc = cfg.train
    for key in ("epochs", "log_every"):
        if getattr(tc, key) <= 0:
            raise ValueError(f"train.{key} must be positive, got {getattr(tc, key)}.")
    if tc.checkpoint_every_steps < 0:
        raise ValueError(f"train.checkpoint_every_steps must be >= 0, got "
                         f"{tc.checkpoint_every_steps}.")


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What a run of `cfg` on data of `spec` computes with, all made once by `build`; nothing here
    holds data or a train state.

    `init_state` gives the initial state (`abstract` its shapes, the target of a restore),
    `epoch_steps[epoch - 1]` the compiled `(state, batch, train_key) -> (state, metrics)` of each
    epoch (one program, or one per set of frozen layers under transfer learning), `eval_step` the
    compiled evaluation of a batch, `learning_rate(step, plateau_scale)` the rate of an update;
    `pure_train_step` is the un-jitted step for programs of one's own (a sweep's vmap)."""

    cfg: Config
    spec: DatasetSpec
    steps_per_epoch: int
    model: Any
    tx: optax.GradientTransformation
    plateau: Any
    augmenter: augment.Compose
    options: StepOptions
    passes: int  # forward/backward passes of a step on the devices it was built for
    abstract: TrainState
    epoch_steps: tuple[Callable, ...]
    eval_step: Callable
    learning_rate: Callable[[int, float], float]
    update_plateau: Callable[[Any, float], Any]  # (plateau state, epoch's figure) -> next state
    evaluated: Callable[[TrainState], TrainState]  # the parameters' EMA, when optim keeps one
    num_params: int
    lowerings: dict[str, dict[str, str]] | None  # each conv's lowering per pass (summary.json)
    init_key: jax.Array
    train_key: jax.Array
    sharding: Any = None  # where the state lives: None (the default device) or a NamedSharding
    _pure: Callable = dataclasses.field(repr=False, compare=False, default=None)

    def init_state(self, key: jax.Array | None = None) -> TrainState:
        """The initial state from the run's init key (or `key`: a sweep's other seeds), with the
        backbone's weights when `transfer.backbone` names one (read, and refused, here)."""
        key = self.init_key if key is None else key
        state = jax.jit(self._create, out_shardings=self.sharding)(key)
        if self.cfg.transfer.backbone is not None:
            state = transfer.initialize(state, self.cfg, self.model)
            state = state if self.sharding is None else jax.device_put(state, self.sharding)
        return state

    def evaluate(self, state: TrainState, batches) -> dict[str, Any]:
        """`evaluate` of `state`: of its parameters' EMA where the optimizer keeps one."""
        return evaluate(self.eval_step, self.evaluated(state), batches)

    def _create(self, key: jax.Array) -> TrainState:
        return create_train_state(self.model, self.tx, self.plateau, self.spec.image_shape, key)

    def pure_train_step(self) -> Callable:
        """The first epoch's step pure and un-jitted, for callers that compile it into a program
        of their own."""
        return self._pure


def build(cfg: Config, spec: DatasetSpec, steps_per_epoch: int, devices: int = 1,
          sharding: Any = None, eval_rows: int | None = None) -> RunParts:
    """The parts of a run of `cfg` on data described by `spec`, `steps_per_epoch` steps an epoch
    (the per-step schedules and transfer's unfreezing count in steps), on `devices` devices with
    the state placed by `sharding`; `eval_rows`, an evaluation batch's global rows, sizes the
    recorded conv lowerings. Raises ValueError naming the setting at fault before anything
    compiles."""
    check_lengths(cfg)
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    tc = cfg.train
    init_key, train_key = seed_keys(tc.seed)
    # the names the config gives, looked up as a user's are: registered, or package.module:Name
    factory, loss_fn = MODELS.lookup(cfg.model.name), LOSSES.lookup(tc.loss)
    model = model_from(factory, cfg.model, spec.num_classes)
    check_model(model, spec.image_shape, spec.num_classes, cfg.model.name)
    variables, example_ids = abstract_variables(model, spec.image_shape), accepts_example_ids(model)
    loss, eval_loss = losses_from(loss_fn, tc, spec.num_classes)
    options = StepOptions(loss, eval_loss, mix.from_config(cfg.augment), tc.dtype, example_ids)
    # Transfer learning: the optimizer's parameter groups and, under frozen batch norm, one model
    # per epoch (refused here for a model that cannot hold it)
    plan = transfer.plan(cfg, model, variables, steps_per_epoch) if cfg.transfer.groups else None
    models = plan.models if plan else (model,)
    tx = make_optimizer(cfg.optim, steps_per_epoch, tc.epochs, plan and plan.groups)
    plateau = make_plateau(cfg.optim)
    learning_rate = rate_function(cfg.optim, steps_per_epoch, tc.epochs)
    augmenter = augment.from_config(cfg.augment)
    # the optimizer meets the parameters: transfer's labels are checked here
    abstract = jax.eval_shape(lambda key: create_train_state(model, tx, plateau, spec.image_shape,
                                                             key), jax.random.key(0))
    passes = grad_passes(tc.batch_size // devices, tc.microbatch,
                         bool(variables.get("batch_stats")))
    steps: dict[tuple, Callable] = {}  # one compiled step per distinct model: by frozen prefixes
    for m in models:
        if getattr(m, "frozen", ()) not in steps:
            steps[getattr(m, "frozen", ())] = make_train_step(
                m, tx, spec.mean, spec.std, augmenter, tc.microbatch, options=options)
    eval_step = make_eval_step(model, spec.mean, spec.std, spec.num_classes, options=options)
    pure = make_train_step(models[0], tx, spec.mean, spec.std, augmenter, tc.microbatch,
                           options=options, compiled=False)
    lowerings = None
    if eval_rows is not None:  # the rows a conv sees: a pass's global rows under jit over the mesh
        infer_rows = eval_pass_rows(eval_rows // devices) * devices
        train = conv_lowerings(model, spec.image_shape, max(1, tc.batch_size // passes))
        infer = conv_lowerings(model, spec.image_shape, infer_rows)
        lowerings = {name: {**p, "inference": infer[name]["inference"]} for name, p in train.items()}
    if sharding is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                abstract)
    return RunParts(
        cfg=cfg, spec=spec, steps_per_epoch=steps_per_epoch, model=model, tx=tx, plateau=plateau,
        augmenter=augmenter, options=options, passes=passes, abstract=abstract,
        epoch_steps=tuple(steps[getattr(models[min(e, len(models) - 1)], "frozen", ())]
                          for e in range(tc.epochs)),
        eval_step=eval_step,
        learning_rate=learning_rate, update_plateau=functools.partial(plateau_step, plateau),
        evaluated=evaluated_state,
        num_params=sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params)),
        lowerings=lowerings, init_key=init_key, train_key=train_key, sharding=sharding, _pure=pure)


def build_members(cfgs: Sequence[Config], spec: DatasetSpec, steps_per_epoch: int, *,
                  sharding: Any = None, eval_rows: int | None = None) -> list[RunParts]:
    """The parts of several runs trained side by side (a sweep's members), each as `build` makes
    it for its config. The configs may differ only in their seed and in values no evaluation
    reads (`traced.TRACEABLE`, and the plateau and early-stopping settings): configs equal but for
    the seed share one build, their compiled steps included, and all share one evaluation step."""
    builds: dict[str, RunParts] = {}
    out = []
    for cfg in cfgs:
        key = cfg.set("train.seed", 0).to_json()
        if key not in builds:
            builds[key] = build(cfg, spec, steps_per_epoch, sharding=sharding, eval_rows=eval_rows)
        init_key, train_key = seed_keys(cfg.train.seed)
        out.append(dataclasses.replace(builds[key], cfg=cfg, init_key=init_key,
                                       train_key=train_key, eval_step=out[0].eval_step if out
                                       else builds[key].eval_step))
    return out


def traced_train_step(parts: RunParts, keys: Sequence[str]) -> Callable:
    """`step(state, values, batch, rng) -> (state, metrics)`, pure and un-jitted: `parts`'s train
    step with the config values at `keys` (of `traced.TRACEABLE`) read from `values`, the arrays
    `traced.values_of` gives, so that one program (a sweep's `vmap`) trains configs that differ
    in them. Its model, optimizer, augmentation and loss come from the same factories as `build`'s,
    given the config with the arrays in place (`traced.with_values`)."""
    cfg, spec, tc = parts.cfg, parts.spec, parts.cfg.train
    unknown = sorted(set(keys) - set(traced.TRACEABLE))
    if unknown:
        raise ValueError(f"{unknown} cannot be held as arrays in one program; those that can: "
                         f"{sorted(traced.TRACEABLE)}.")
    if cfg.transfer.active:
        raise ValueError("a traced train step does not take transfer learning (cfg.transfer).")
    sections = {key.split(".")[0] for key in keys}

    def step(state: TrainState, values: dict[str, jax.Array], batch: dict[str, jax.Array],
             rng: jax.Array):
        at = traced.with_values(cfg, {key: values[key] for key in keys})
        model = build_model(at.model, spec.num_classes) if "model" in sections else parts.model
        tx = (make_optimizer(at.optim, parts.steps_per_epoch, tc.epochs) if "optim" in sections
              else parts.tx)
        loss = (make_losses(at.train, spec.num_classes)[0] if "train" in sections
                else parts.options.loss)
        options = dataclasses.replace(parts.options, loss=loss, mixing=mix.from_config(at.augment))
        warps = {key.split(".")[1]: values[key] for key in keys
                 if key.startswith("augment.") and key.split(".")[1] in augment.TRACEABLE}
        augmenter = augment.from_config(at.augment, traced=warps) if warps else parts.augmenter
        pure = make_train_step(model, tx, spec.mean, spec.std, augmenter, tc.microbatch,
                               options=options, compiled=False)
        return pure(state, batch, rng)

    return step
