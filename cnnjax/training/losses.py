"""Losses: `(logits, labels) -> per-example loss`, by registered name or import path.

`train.loss` names one (`cross_entropy` by default, or `package.module:fn`); the step averages
it over the batch. `train.label_smoothing` smooths cross-entropy's targets in training
(optax.smooth_labels); evaluation reports the plain loss. A user's loss is checked on abstract
logits before anything is compiled.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cnnjax import imports
from cnnjax.config import TrainConfig

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class NonFiniteStep(FloatingPointError):
    """A step whose loss or gradient norm was NaN or infinite: the run stops there; `step` names
    the step (a sweep's member leaves at it)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NonFiniteLoss(NonFiniteStep):
    """The loss itself was NaN or infinite at a step (not only its gradient): the run stops there,
    naming `train.loss`."""


LOSSES = imports.Registry("loss", "train.loss")
register_loss = LOSSES.register
register_loss("cross_entropy", cross_entropy)


def smoothed_cross_entropy(smoothing: float) -> LossFn:
    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    return loss


def make_losses(tc: TrainConfig, num_classes: int) -> tuple[LossFn, LossFn]:
    """(training loss, evaluation loss) of the config, checked on a (2, num_classes) batch."""
    return losses_from(LOSSES.lookup(tc.loss), tc, num_classes)


def losses_from(loss: Any, tc: TrainConfig, num_classes: int) -> tuple[LossFn, LossFn]:
    """`make_losses` of `loss`, what `train.loss` names in `LOSSES`.

    A `label_smoothing` held as an array (a traced config, one program for several values, each
    checked as a number before) always smooths: 0 gives the one-hot targets."""
    smoothing = tc.label_smoothing
    traced = not isinstance(smoothing, (int, float))
    if not callable(loss):
        raise ValueError(f"train.loss {tc.loss!r} is {imports.kind(loss)}, not a function "
                         f"(logits, labels) -> per-example loss.")
    if not traced and smoothing and loss is not cross_entropy:
        raise ValueError(f"train.label_smoothing applies to cross_entropy; {tc.loss!r} would "
                         f"ignore it: smooth inside your loss, or set train.label_smoothing=0.")
    logits = jax.ShapeDtypeStruct((2, num_classes), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    try:
        out = jax.eval_shape(loss, logits, labels)
    except Exception as err:  # the user's function: any failure is a misfit, reported as one
        raise ValueError(f"train.loss {tc.loss!r} fails on logits (2, {num_classes}) and int "
                         f"labels (2,): {imports.where(err)}{imports.first_line(err)}") from None
    if getattr(out, "shape", None) != (2,):
        raise ValueError(f"train.loss {tc.loss!r} returns {getattr(out, 'shape', out)} for 2 "
                         f"examples; it must return one loss per example, shape (2,).")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"train.loss {tc.loss!r} returns {out.dtype} losses; they must be "
                         f"floats, differentiable in the logits.")
    train = smoothed_cross_entropy(smoothing) if traced or smoothing else loss
    return train, loss
