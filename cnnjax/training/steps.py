"""The train state and the pure, compiled train and eval steps.

`train_step(state, batch, rng) -> (state, metrics)` and `eval_step(state, batch) -> metrics` close
over the model, the optimizer and the normalization constants; `make_train_step` compiles the train
step with the state donated, so XLA updates parameters and moments in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cnnjax.data.augment import Compose
from cnnjax.data.mix import Mixing
from cnnjax.training.losses import cross_entropy
from cnnjax.data.pixels import normalize

# Streams folded into each step's key, so dropout, augmentation and mixing never share a draw.
DROPOUT_STREAM, AUGMENT_STREAM, MIX_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a step computes besides the model: its loss (`train.loss`, `train.label_smoothing`),
    mixup/CutMix (`augment.mixup`, `augment.cutmix`) and compute dtype (`train.dtype`)."""

    loss: Callable = cross_entropy  # (logits, labels) -> per-example loss, in training
    eval_loss: Callable = cross_entropy  # the loss evaluation reports
    mixing: Mixing = Mixing()
    dtype: str = "float32"  # 'bfloat16': activations and matmuls; params, grads and loss f32
    # whether the model's __call__ takes each row's example index (per-example dropout keys);
    # `cnnjax.build` reads it off the model (`nn.models.accepts_example_ids`)
    example_ids: bool = True

    def cast(self, tree):
        """The tree in the compute dtype (float32: untouched, so the default graph is unchanged)."""
        if self.dtype == "float32":
            return tree
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

# XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK by default. For
# training the seed CNN that cost 1.3-2.9x (YNNPACK's convolution gradients ran about 2x slower than
# XLA's own Eigen convolutions; docs/performance.md), so train steps keep only YNNPACK's reductions:
# without them XLA's own f32 reductions over a whole batch (batch-norm statistics, the loss) were
# accurate to only ~1e-5, and one-device runs drifted from multi-device ones. Evaluation keeps the
# default, where YNNPACK fuses the whole forward pass into one graph (within ±15% either way).
# Only passed on CPU.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def train_compiler_options() -> dict[str, str] | None:
    """Per-jit XLA options for train steps (and small eval passes) on the default backend
    (`jax.jit(compiler_options=)`)."""
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


# On CPU a step's working set (at 28x28, about 1.4 MB of activations and their gradients per
# image) outgrows the caches beyond about 64 images; a step over more images runs as several
# forward/backward passes of at most this many rows per device, each its own XLA execution, their
# gradients summed (+36-48% at batch 128-512; docs/performance.md). Written out in one XLA
# program the passes gain little (XLA:CPU presumably overlaps them).
CPU_MICROBATCH = 64
# Evaluation (forward only, a quarter of the memory per image) likewise, beyond 256 rows per device.
CPU_EVAL_MICROBATCH = 256
# Eval passes of at most this many rows compile with the train steps' options (XLA's own Eigen
# convolutions): XLA's default, one YNNPACK graph for the whole forward pass, keeps about 1.2 of 2
# cores busy there; the seed CNN's batch-32 eval step ran +13-21% faster, batch 64 0.95-1.0x.
CPU_EVAL_SMALL_PASS = 32


def grad_passes(rows: int, microbatch: int | None = None, batch_norm: bool = False) -> int:
    """How many forward/backward passes a step over `rows` images per device is split into.

    The step's gradient is the sum of its passes' gradients: the whole batch's gradient up to float
    summation order. `microbatch` is the rows per device in one pass; None picks it: on CPU the
    fewest equal passes of at most CPU_MICROBATCH rows (one pass if those would be tiny), one pass
    on accelerators and for models with batch norm, whose statistics are the whole batch's.
    """
    if microbatch is not None:
        if microbatch <= 0 or rows % microbatch:
            sizes = [d for d in range(1, rows + 1) if rows % d == 0]
            raise ValueError(f"train.microbatch={microbatch} must divide the {rows} images each "
                             f"device gets per step; choose one of {sizes}.")
        if batch_norm and microbatch != rows:
            raise ValueError(f"train.microbatch={microbatch} would split each step into passes, "
                             f"but this model's batch-norm statistics are per batch ({rows} images "
                             f"per device); leave train.microbatch unset.")
        return rows // microbatch
    if batch_norm or jax.default_backend() != "cpu":
        return 1
    return _cpu_passes(rows, CPU_MICROBATCH)


def _cpu_passes(rows: int, most: int) -> int:
    """The fewest equal passes of at most `most` rows; one pass if those would be under most / 4."""
    passes = next(p for p in range(-(-rows // most), rows + 1) if rows % p == 0)
    return passes if rows // passes >= most // 4 else 1


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mean: float,
                    std: float, augment: Compose = Compose(()), microbatch: int | None = None,
                    *, options: StepOptions = StepOptions(), compiled: bool = True) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`, compiled, the state donated.

    A batch of one pass (`grad_passes`, from its rows per device) runs as one jitted step; a larger
    one as a jitted gradient pass per share of its rows, accumulating into a donated buffer, then a
    jitted update: each pass is its own XLA execution, so its working set stays in cache.

    With `compiled=False`, the same step pure and un-jitted, for callers that compile it inside
    their own program (cnnjax sweep's vmap and unrolled lowerings): its passes are written out
    one after another, the same sums.
    """
    grad_pass, apply_update = _train_step_parts(model, tx, mean, std, augment, options=options)
    passes_for = functools.cache(lambda rows, batch_norm: grad_passes(rows, microbatch, batch_norm))
    if not compiled:
        def pure_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
            passes = passes_for(batch["label"].shape[0], bool(state.batch_stats))
            return apply_update(state, _sum_passes(grad_pass, grad_pass, passes, state, batch, rng))

        return pure_step

    xla = train_compiler_options()
    whole = jax.jit(lambda state, batch, rng: apply_update(state, grad_pass(state, batch, rng, 0, 1)),
                    donate_argnums=0, compiler_options=xla)
    first = jax.jit(grad_pass, static_argnums=4, compiler_options=xla)
    more = jax.jit(grad_pass, static_argnums=4, donate_argnums=5, compiler_options=xla)
    update = jax.jit(apply_update, donate_argnums=0, compiler_options=xla)

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        passes = passes_for(_rows_per_device(batch), bool(state.batch_stats))
        if passes == 1:
            return whole(state, batch, rng)
        return update(state, _sum_passes(first, more, passes, state, batch, rng))

    return train_step


def _rows_per_device(batch: dict[str, Any]) -> int:
    labels = batch["label"]
    return labels.shape[0] // (len(labels.sharding.device_set) if isinstance(labels, jax.Array) else 1)


def _sum_passes(first: Callable, more: Callable, passes: int, *args):
    """`first(*args, 0, passes)`, then `more(*args, index, passes, acc)` for the other passes: the
    passes' sums. `first` and `more` are one pass function, `more` compiled to donate `acc`."""
    acc = first(*args, 0, passes)
    for index in range(1, passes):
        acc = more(*args, index, passes, acc)
    return acc


def _pass_rows(x: jax.Array, index: jax.Array | int, passes: int) -> jax.Array:
    """Rows index, index + passes, ...: under a batch sharded over devices each pass takes the same
    share of every device's rows, so no rows move between devices."""
    if passes == 1:
        return x
    split = x.reshape(x.shape[0] // passes, passes, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(split, index, axis=1, keepdims=False)


def _model_input(pixels: jax.Array, mean: float, std: float, options: StepOptions) -> jax.Array:
    """What the model sees of host pixels (0..255 units): normalized, in the compute dtype."""
    return options.cast(normalize(pixels, mean, std))


def _train_step_parts(model: nn.Module, tx: optax.GradientTransformation, mean: float,
                     std: float, augment: Compose = Compose(()),
                     *, options: StepOptions = StepOptions()) -> tuple[Callable, Callable]:
    """A train step as `grad_pass(state, batch, rng, index, passes, acc=None) -> acc`, run for
    index 0..passes-1, then `apply_update(state, acc) -> (state, metrics)`.

    `rng` is the run's training key; the step folds in its own step number, then a stream per use,
    then (inside dropout and augmentation) each example's 'index', so a pass draws for its examples
    exactly what the whole batch would. The loss is the batch mean: each pass adds its share.
    Mixing partners are rows of the whole batch (`cnnjax.data.mix`), so passes do not change them.
    """
    takes_ids = options.example_ids

    def grad_pass(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array,
                  index: jax.Array | int, passes: int, acc: dict[str, Any] | None = None):
        size = batch["label"].shape[0]
        rows = jax.tree.map(lambda x: _pass_rows(x, index, passes), batch)
        labels, ids = rows["label"], rows["index"]
        step_rng = jax.random.fold_in(rng, state.step)
        augment_rng = jax.random.fold_in(step_rng, AUGMENT_STREAM)
        pixels = augment(rows["image"].astype(jnp.float32), augment_rng, ids)
        if options.mixing.on:
            partner = (_pass_rows(jnp.arange(size), index, passes) - 1) % size
            partner_pixels = augment(batch["image"][partner].astype(jnp.float32), augment_rng,
                                     batch["index"][partner])
            pixels, lam = options.mixing(pixels, partner_pixels, ids,
                                         jax.random.fold_in(step_rng, MIX_STREAM))
        images = _model_input(pixels, mean, std, options)
        dropout_rng = jax.random.fold_in(step_rng, DROPOUT_STREAM)
        extra = {"example_ids": ids} if takes_ids else {}

        def loss_fn(params):
            logits, updated = model.apply(
                {"params": options.cast(params), "batch_stats": state.batch_stats},
                images, train=True, rngs={"dropout": dropout_rng},
                mutable=["batch_stats"], **extra)
            logits = logits.astype(jnp.float32)
            losses = options.loss(logits, labels)
            if options.mixing.on:
                losses = lam * losses + (1.0 - lam) * options.loss(logits, batch["label"][partner])
            return jnp.sum(losses) / size, (logits, updated.get("batch_stats", {}))

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        sums = {"loss": loss, "grads": grads,
                "accuracy": jnp.sum(jnp.argmax(logits, -1) == labels) / size}
        if acc is not None:
            sums = jax.tree.map(jnp.add, {k: acc[k] for k in sums}, sums)
        return {**sums, "batch_stats": batch_stats}

    def apply_update(state: TrainState, acc: dict[str, Any]):
        loss, grads = acc["loss"], acc["grads"]
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
                                  batch_stats=keep(acc["batch_stats"], state.batch_stats),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "accuracy": acc["accuracy"], "grad_norm": grad_norm,
                   "finite": finite, **_layer_norms(grads)}
        return new_state, metrics

    return grad_pass, apply_update


def make_eval_step(model: nn.Module, mean: float, std: float, num_classes: int,
                   *, options: StepOptions = StepOptions()) -> Callable:
    """The compiled `eval_step(state, batch) -> metrics`: masked sums and a confusion matrix.

    On CPU a batch of more than CPU_EVAL_MICROBATCH rows per device runs as several passes, each
    its own XLA execution, whose sums add up (as `make_train_step` does for training); passes of
    at most CPU_EVAL_SMALL_PASS rows compile with the train steps' XLA options.
    """

    def eval_pass(state: TrainState, batch: dict[str, jax.Array], index: jax.Array | int,
                  passes: int, acc: dict[str, jax.Array] | None = None):
        rows = jax.tree.map(lambda x: _pass_rows(x, index, passes), batch)
        logits = model.apply({"params": options.cast(state.params), "batch_stats": state.batch_stats},
                             _model_input(rows["image"], mean, std, options), train=False)
        logits = logits.astype(jnp.float32)
        labels, mask = rows["label"], rows["mask"]
        losses = options.eval_loss(logits, labels)
        preds = jnp.argmax(logits, -1)
        confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, preds].add(
            mask.astype(jnp.int32))
        sums = {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum((preds == labels) * mask),
                "count": jnp.sum(mask), "confusion": confusion}
        return sums if acc is None else jax.tree.map(jnp.add, acc, sums)

    def compiled(xla):
        return (jax.jit(eval_pass, static_argnums=3, compiler_options=xla),
                jax.jit(eval_pass, static_argnums=3, donate_argnums=4, compiler_options=xla))

    small, large = compiled(train_compiler_options()), compiled(None)

    @functools.cache
    def plan(rows: int):
        """(first, more, passes) for `rows` per device."""
        passes = _eval_passes(rows)
        small_pass = jax.default_backend() == "cpu" and rows // passes <= CPU_EVAL_SMALL_PASS
        return (*(small if small_pass else large), passes)

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        return _sum_passes(*plan(_rows_per_device(batch)), state, batch)

    return eval_step


def _eval_passes(rows: int) -> int:
    return _cpu_passes(rows, CPU_EVAL_MICROBATCH) if jax.default_backend() == "cpu" else 1


def eval_pass_rows(rows: int) -> int:
    """The rows per device of one pass of an evaluation batch of `rows` per device."""
    return rows // _eval_passes(rows)


def inference_state(variables: dict[str, Any]) -> TrainState:
    """A state holding only what evaluation reads, for models restored from a run."""
    return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), opt_state=None,
                      plateau_state=None)
