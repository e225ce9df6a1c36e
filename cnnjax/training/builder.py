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
from typing import Any, Callable

import jax
import optax

from cnnjax.config import Config
from cnnjax.data import augment
from cnnjax.data.datasets import DatasetSpec
from cnnjax.nn.models import build_model, check_model, has_batch_stats
from cnnjax.training import transfer
from cnnjax.training.optim import learning_rate_at, make_optimizer, make_plateau
from cnnjax.training.steps import (StepOptions, TrainState, create_train_state, grad_passes,
                                   make_eval_step, make_train_step)


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run with this seed."""
    init_rng, train_rng = jax.random.split(jax.random.key(seed))
    return init_rng, train_rng


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
    """What a run of `cfg` on data of `spec` computes with; nothing here holds data or state.

    `init_state` and `abstract_state` give the train state, `train_step(epoch)` the compiled
    step of an epoch, `eval_step` the compiled evaluation; `pure_train_step` is the un-jitted step
    for programs of one's own (a sweep's vmap)."""

    cfg: Config
    spec: DatasetSpec
    steps_per_epoch: int
    model: Any
    tx: optax.GradientTransformation
    plateau: Any
    augmenter: augment.Compose
    options: StepOptions
    batch_norm: bool  # the model keeps batch statistics: one pass per step, whatever the rows
    eval_step: Callable
    # compiled steps and the abstract state, made on first use (what they hold never changes)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def passes(self, rows_per_device: int) -> int:
        """Forward/backward passes of a step over `rows_per_device` images (`steps.grad_passes`)."""
        return grad_passes(rows_per_device, self.cfg.train.microbatch, self.batch_norm)

    def init_state(self, key: jax.Array, sharding: Any = None) -> TrainState:
        """The run's initial state from its init key (placed by `sharding`), with the backbone's
        weights when `transfer.backbone` names one (read, and refused, here)."""
        state = jax.jit(self._create, out_shardings=sharding)(key)
        if self.cfg.transfer.backbone is not None:
            state = transfer.initialize(state, self.cfg, self.model)
            state = state if sharding is None else jax.device_put(state, sharding)
        return state

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes, nothing computed: the target of a restore."""
        if "abstract" not in self._cache:
            self._cache["abstract"] = jax.eval_shape(self._create, jax.random.key(0))
        return self._cache["abstract"]

    def _create(self, key: jax.Array) -> TrainState:
        return create_train_state(self.model, self.tx, self.plateau, self.spec.image_shape, key)

    def train_step(self, epoch: int = 1) -> Callable:
        """The compiled `(state, batch, train_key) -> (state, metrics)` of `epoch`: one program
        for the run, or one per set of frozen layers when transfer learning unfreezes some."""
        frozen = (transfer.frozen_at(self.cfg.transfer, self.abstract_state().params, epoch)
                  if self.cfg.transfer.groups else ())
        if ("step", frozen) not in self._cache:
            self._cache["step", frozen] = make_train_step(
                self._model_for(epoch), self.tx, self.spec.mean, self.spec.std, self.augmenter,
                self.cfg.train.microbatch, options=self.options)
        return self._cache["step", frozen]

    def pure_train_step(self) -> Callable:
        """The same step pure and un-jitted (epoch 1's model), for callers that compile it into
        a program of their own."""
        return make_train_step(self._model_for(1), self.tx, self.spec.mean, self.spec.std,
                               self.augmenter, self.cfg.train.microbatch, options=self.options,
                               compiled=False)

    def _model_for(self, epoch: int):
        if not self.cfg.transfer.groups:
            return self.model
        return transfer.model_for_epoch(self.model, self.cfg.transfer, self.abstract_state(), epoch)

    def learning_rate(self, step: int, plateau_scale: float) -> float:
        """The rate of the update from `step` (the schedule's, times the plateau rule's scale)."""
        return learning_rate_at(self.cfg.optim, step, plateau_scale, self.steps_per_epoch,
                                self.cfg.train.epochs)


def build(cfg: Config, spec: DatasetSpec, steps_per_epoch: int) -> RunParts:
    """The parts of a run of `cfg` on data described by `spec`, `steps_per_epoch` steps an epoch
    (the per-step schedules and transfer's unfreezing count in steps); raises ValueError naming
    the setting at fault before anything compiles."""
    check_lengths(cfg)
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    model = build_model(cfg.model, spec.num_classes)
    check_model(model, spec.image_shape, spec.num_classes, cfg.model.name)
    options = StepOptions.from_config(cfg, spec.num_classes)
    if cfg.transfer.groups:
        tx = transfer.make_transfer_optimizer(cfg, steps_per_epoch)
    else:
        tx = make_optimizer(cfg.optim, steps_per_epoch, cfg.train.epochs)
    plateau = make_plateau(cfg.optim)
    parts = RunParts(cfg=cfg, spec=spec, steps_per_epoch=steps_per_epoch, model=model, tx=tx,
                     plateau=plateau, augmenter=augment.from_config(cfg.augment), options=options,
                     batch_norm=has_batch_stats(model, spec.image_shape),
                     eval_step=make_eval_step(model, spec.mean, spec.std, spec.num_classes,
                                              options=options))
    parts.abstract_state()  # the optimizer meets the parameters: transfer's labels are checked
    parts._model_for(1)  # a frozen batch norm the model cannot hold still is refused here
    return parts
