"""The optimizer: one function composing optax pieces to reproduce the seed's torch.optim.Adam.

torch.optim.Adam(lr, weight_decay, amsgrad=True) differs from optax's stock transforms twice:
- weight decay is coupled L2 (decay * param added to the gradient before the moments), which is
  `optax.add_decayed_weights` placed before the Adam scaling, not `optax.adamw`;
- AMSGrad keeps the running max of the raw second moment and bias-corrects after the max, while
  `optax.scale_by_amsgrad` takes the max of the bias-corrected moment; the two drift apart within a
  few steps, hence `scale_by_torch_adam` below.

The learning rate is scaled on validation-loss plateaus by `optax.contrib.reduce_on_plateau`, kept
as a separate transform whose state the loop updates once per epoch (torch's scheduler.step(val_loss));
the train step multiplies its updates by that state's `scale`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from cnnjax.config import OptimConfig


class ScaleByTorchAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates  # running max of the raw second moment; unused (empty) without AMSGrad


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        amsgrad: bool = False) -> optax.GradientTransformation:
    """Adam's direction exactly as torch computes it: m_hat / (sqrt(max(v)) / sqrt(1 - b2^t) + eps)."""
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"scale_by_torch_adam: {name} must be in [0, 1), got {beta}.")
    if eps < 0:
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


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Coupled weight decay -> torch-style Adam/AMSGrad -> -learning_rate."""
    if cfg.learning_rate <= 0:
        raise ValueError(f"optim.learning_rate must be positive, got {cfg.learning_rate}.")
    if cfg.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be non-negative, got {cfg.weight_decay}.")
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        scale_by_torch_adam(cfg.b1, cfg.b2, cfg.eps, cfg.amsgrad),
        optax.scale_by_learning_rate(cfg.learning_rate),
    )


def make_plateau(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """ReduceLROnPlateau(mode='min', threshold_mode='rel') in optax's terms.

    torch improves when loss < best * (1 - threshold): rtol = threshold, atol = 0. torch counts
    `patience` bad epochs before cutting, optax cuts when its counter reaches `patience`, hence +1.
    torch's min_lr is absolute, optax's min_scale relative to the base rate.
    """
    if not 0 < cfg.plateau_factor < 1:
        raise ValueError(f"optim.plateau_factor must be in (0, 1), got {cfg.plateau_factor}.")
    if cfg.plateau_patience < 0:
        raise ValueError(f"optim.plateau_patience must be >= 0, got {cfg.plateau_patience}.")
    return optax.contrib.reduce_on_plateau(
        factor=cfg.plateau_factor, patience=cfg.plateau_patience + 1, rtol=cfg.plateau_threshold,
        atol=0.0, cooldown=0, accumulation_size=1, min_scale=cfg.min_lr / cfg.learning_rate)


def plateau_step(plateau: optax.GradientTransformationExtraArgs, state, val_loss: float):
    """Feeds one epoch's validation loss to the plateau rule; returns its new state."""
    _, state = plateau.update(updates=(), state=state, value=jnp.asarray(val_loss, jnp.float32))
    return state
