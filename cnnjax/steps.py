"""The train state and the pure, compiled train and eval steps.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(state, batch) -> metrics` close
over the model, the optimizer and the normalization constants; `make_steps` jits them with the state
donated, so XLA updates parameters and moments in place.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cnnjax.augment import Compose
from cnnjax.input_pipeline import normalize

# Streams folded into each step's key, so dropout and augmentation never share a draw.
DROPOUT_STREAM, AUGMENT_STREAM = 1, 2

# XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by default. For
# training the seed CNN that cost 1.3-2.9x (YNNPACK's convolution gradients ran about 2x slower than
# XLA's own Eigen convolutions; docs/performance.md), so train steps keep only YNNPACK's reductions:
# without them XLA's own f32 reductions over a whole batch (batch-norm statistics, the loss) were
# accurate to only ~1e-5, and one-device runs drifted from multi-device ones. Evaluation keeps the
# default, where YNNPACK fuses the whole forward pass into one graph (within ±15% either way).
# Only passed on CPU.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def train_compiler_options() -> dict[str, str] | None:
    """Per-jit XLA options for train steps on the default backend (`jax.jit(compiler_options=)`)."""
    return dict(CPU_TRAIN_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # an empty dict for models without batch normalization
    opt_state: optax.OptState
    plateau_state: Any  # optax.contrib.reduce_on_plateau's state; its `scale` multiplies updates


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, plateau,
                       image_shape: tuple[int, ...], rng: jax.Array) -> TrainState:
    """Initializes parameters from `rng` on a dummy batch of one image."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      plateau_state=plateau.init(params))


def _layer_norms(grads) -> dict[str, jax.Array]:
    return {f"grad_norm/{name}": optax.tree.norm(g) for name, g in grads.items()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mean: float,
                    std: float, augment: Compose = Compose(())) -> Callable:
    """The jitted `train_step(state, batch, rng) -> (state, metrics)`, state donated."""
    return jax.jit(train_step_fn(model, tx, mean, std, augment), donate_argnums=0,
                   compiler_options=train_compiler_options())


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation, mean: float,
                  std: float, augment: Compose = Compose(())) -> Callable:
    """The pure, un-jitted train step, for callers that compile it inside their own program.

    `rng` is the run's training key; the step folds in its own step number, then a stream per use,
    then (inside dropout and augmentation) each example's 'index'.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        labels, ids = batch["label"], batch["index"]
        step_rng = jax.random.fold_in(rng, state.step)
        pixels = augment(batch["image"].astype(jnp.float32),
                         jax.random.fold_in(step_rng, AUGMENT_STREAM), ids)
        images = normalize(pixels, mean, std)
        dropout_rng = jax.random.fold_in(step_rng, DROPOUT_STREAM)

        def loss_fn(params):
            logits, updated = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                example_ids=ids, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updated.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = optax.tree_utils.tree_scale(state.plateau_state.scale, updates)
        params = optax.apply_updates(state.params, updates)
        # A non-finite step is not applied: the state stays the last good one while the host,
        # which sees `finite` in the metrics, stops the run and names the step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + finite.astype(jnp.int32),
                                  params=keep(params, state.params),
                                  batch_stats=keep(batch_stats, state.batch_stats),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
                   "grad_norm": grad_norm, "finite": finite, **_layer_norms(grads)}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, mean: float, std: float, num_classes: int) -> Callable:
    """The jitted `eval_step(state, batch) -> metrics`: masked sums, a confusion matrix."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             normalize(batch["image"], mean, std))
        labels, mask = batch["label"], batch["mask"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        preds = jnp.argmax(logits, -1)
        confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, preds].add(
            mask.astype(jnp.int32))
        return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum((preds == labels) * mask),
                "count": jnp.sum(mask), "confusion": confusion}

    return jax.jit(eval_step)


def inference_state(variables: dict[str, Any]) -> TrainState:
    """A state holding only what evaluation reads, for models restored from a run."""
    return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), opt_state=None,
                      plateau_state=None)


def evaluate(eval_step: Callable, state: TrainState, batches) -> dict[str, Any]:
    """Sums the masked eval metrics over `batches`; one host sync at the end."""
    totals = None
    for batch in batches:
        out = eval_step(state, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count,
            "count": int(count), "confusion": totals["confusion"].tolist()}
