"""Recurrent classifiers trained through time: an Elman RNN and an LSTM on sequential MNIST.

Each 28x28 digit is read as a sequence of 28 time steps of 28 pixels (its rows, top to bottom);
the class is predicted from the last hidden state. The cells are Flax's (`nn.SimpleCell`, the
Elman cell h_t = tanh(x_t W_i + b + h_{t-1} W_h), and `nn.OptimizedLSTMCell`), run by a plain
`lax.scan` over time, so that backpropagation through time (BPTT) is `jax.grad` through that scan,
and truncating it is a `stop_gradient` on the carry.

`elman_bptt` writes BPTT out by hand for the Elman RNN, and returns ∂L/∂h_t for every step;
`hidden_grads` gets the same quantity for either cell by autodiff, through a zero "tap" added to
each h_t. Their norms against t show the vanishing gradient: through the RNN, ∂L/∂h_t is
multiplied at every step back by W_h^T diag(1 - h²), while the LSTM's cell state carries it
across steps scaled only by its forget gates. `train` is a small loop of its own, apart from
`cnnjax.training`'s (which is for image CNNs): a sequence model with truncated BPTT, taught in full.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cnnjax.lab import backprop
from cnnjax.data.pixels import normalize

CELLS = {"rnn": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell}


def sequences(images: np.ndarray | jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 (N, 28, 28) or (N, 28, 28, 1) digits -> normalized float32 (N, T=28, F=28) rows."""
    images = jnp.asarray(images)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"sequences: expected single-channel images, got shape "
                             f"{images.shape}.")
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"sequences: expected (N, H, W) or (N, H, W, 1) images, got shape "
                         f"{images.shape}.")
    return normalize(images, mean, std)


@dataclasses.dataclass(frozen=True)
class RecurrentClassifier:
    """A Flax cell scanned over time, then a dense readout of the last hidden state.

    Parameters are {'cell': the cell's params, 'head': {'kernel', 'bias'}}; for the LSTM, 'hf' holds
    the forget gate's bias (flax's OptimizedLSTMCell names). `truncate=k` stops
    the gradient on the carry entering steps k, 2k, ... (truncated BPTT); None backpropagates
    through all steps. The object is hashable, so it can be a static argument of `jax.jit`.
    """

    cell: str = "lstm"  # 'rnn' (Elman) or 'lstm'
    hidden: int = 128
    num_classes: int = 10
    truncate: int | None = None
    # Added to the LSTM's forget-gate bias at init (flax initializes it to 0, a forget gate of 0.5
    # that halves the cell state's memory every step); 1 is Jozefowicz et al.'s (2015) advice and
    # Keras's default. Ignored by the Elman cell.
    forget_bias: float = 1.0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}.")
        if self.hidden <= 0:
            raise ValueError(f"hidden must be a positive number of units, got {self.hidden}.")
        if self.truncate is not None and self.truncate <= 0:
            raise ValueError(f"truncate must be a positive number of steps or None (full BPTT), "
                             f"got {self.truncate}.")

    def flax_cell(self) -> nn.Module:
        return CELLS[self.cell](features=self.hidden)

    def zero_carry(self, batch: int, dtype=jnp.float32):
        h = jnp.zeros((batch, self.hidden), dtype)
        return (h, h) if self.cell == "lstm" else h  # the LSTM's carry is (c, h)

    def init(self, key: jax.Array, input_size: int) -> dict:
        cell_key, head_key = jax.random.split(key)
        x = jnp.zeros((1, input_size), jnp.float32)
        cell = self.flax_cell().init(cell_key, self.zero_carry(1), x)["params"]
        if self.cell == "lstm":
            cell = {**cell, "hf": {**cell["hf"], "bias": cell["hf"]["bias"] + self.forget_bias}}
        head = nn.Dense(self.num_classes).init(head_key, jnp.zeros((1, self.hidden)))["params"]
        return {"cell": cell, "head": head}

    def hidden_states(self, params: dict, xs: jax.Array, taps: jax.Array | None = None
                      ) -> jax.Array:
        """(N, T, F) inputs -> (N, T, H) hidden states h_1..h_T.

        `taps` (N, T, H), normally zeros, is added to each h_t before it moves on: the gradient
        with respect to it is ∂L/∂h_t, everything that flows back into step t.
        """
        if xs.ndim != 3:
            raise ValueError(f"expected (batch, time, features) inputs, got shape {xs.shape}.")
        n, steps, _ = xs.shape
        cell = self.flax_cell()
        dtype = jnp.result_type(xs, *jax.tree.leaves(params["cell"]))  # the carry's, as promoted
        taps = jnp.zeros((n, steps, self.hidden), dtype) if taps is None else taps

        def step(state, inputs):
            t, x_t, tap_t = inputs
            if self.truncate is not None:
                cut = (t > 0) & (t % self.truncate == 0)
                state = jax.tree.map(lambda s: jnp.where(cut, lax.stop_gradient(s), s), state)
            state, h = cell.apply({"params": params["cell"]}, state, x_t)
            h = h + tap_t
            state = (state[0], h) if self.cell == "lstm" else h
            return state, h

        inputs = (jnp.arange(steps), jnp.swapaxes(xs, 0, 1), jnp.swapaxes(taps, 0, 1))
        _, hs = lax.scan(step, self.zero_carry(n, dtype), inputs)
        return jnp.swapaxes(hs, 0, 1)

    def apply(self, params: dict, xs: jax.Array, taps: jax.Array | None = None) -> jax.Array:
        """(N, T, F) sequences -> (N, num_classes) logits, read from the last hidden state."""
        h_last = self.hidden_states(params, xs, taps)[:, -1]
        return backprop.dense_forward(h_last, params["head"]["kernel"], params["head"]["bias"])

    def loss(self, params: dict, xs: jax.Array, labels: jax.Array,
             taps: jax.Array | None = None) -> jax.Array:
        """Mean softmax cross-entropy."""
        logits = self.apply(params, xs, taps)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hidden_grads(model: RecurrentClassifier, params: dict, xs: jax.Array, labels: jax.Array
                 ) -> jax.Array:
    """∂L/∂h_t for every example and step, (N, T, H), by autodiff through the scan (any cell)."""
    taps = jnp.zeros((*xs.shape[:2], model.hidden), jnp.result_type(xs, *jax.tree.leaves(params)))
    return jax.grad(lambda taps: model.loss(params, xs, labels, taps))(taps)


def grad_norms_per_step(dh: jax.Array) -> jax.Array:
    """Mean over examples of ||∂ℓ_n/∂h_t|| for each step t, from ∂L/∂h_t of the mean loss L.

    L = mean_n ℓ_n, so an example's own gradient is N times its row of ∂L/∂h_t.
    """
    return jnp.linalg.norm(dh * dh.shape[0], axis=-1).mean(axis=0)


def elman_bptt(params: dict, xs: jax.Array, labels: jax.Array, truncate: int | None = None
               ) -> tuple[jax.Array, dict, jax.Array]:
    """Loss, gradient and ∂L/∂h_t (N, T, H) of the Elman classifier, by BPTT written out by hand.

    Forward: h_t = tanh(z_t), z_t = x_t W_i + b_i + h_{t-1} W_h, h_0 = 0, logits = h_T W_o + b_o.
    Backward, from δh_T = δ_logits W_o^T and t = T down to 1:
        δz_t = δh_t ⊙ (1 - h_t²)                        (tanh' written with h_t)
        ∂L/∂W_i += x_t^T δz_t,  ∂L/∂b_i += Σ_n δz_t,  ∂L/∂W_h += h_{t-1}^T δz_t
        δh_{t-1} = δz_t W_h^T                           (zero where truncation cut the carry)
    The parameters are shared by all steps, so their gradients sum over steps: BP3 and BP4 of
    `cnnjax.lab.backprop` applied to the network unrolled in time. Same params tree as
    `RecurrentClassifier(cell='rnn')`.
    """
    w_i, b_i = params["cell"]["i"]["kernel"], params["cell"]["i"]["bias"]
    w_h = params["cell"]["h"]["kernel"]
    w_o, b_o = params["head"]["kernel"], params["head"]["bias"]
    xs_t = jnp.swapaxes(xs, 0, 1)  # (T, N, F)
    n, steps = xs.shape[:2]

    def forward_step(h_prev, x_t):
        h = jnp.tanh(x_t @ w_i + b_i + h_prev @ w_h)
        return h, h

    h0 = jnp.zeros((n, w_h.shape[0]), jnp.result_type(xs, w_i, b_i, w_h))
    h_last, hs = lax.scan(forward_step, h0, xs_t)  # hs: (T, N, H), h_1..h_T
    logits = backprop.dense_forward(h_last, w_o, b_o)
    loss = backprop.softmax_cross_entropy(logits, labels)
    delta = backprop.softmax_cross_entropy_delta(logits, labels)
    dh_last, dw_o, db_o = backprop.dense_backward(h_last, w_o, delta)

    h_prevs = jnp.concatenate([h0[None], hs[:-1]])

    def backward_step(carry, inputs):
        dh, dw_i, db_i, dw_h = carry
        t, x_t, h_prev, h = inputs
        dz = dh * (1.0 - h ** 2)
        dw_i, db_i, dw_h = dw_i + x_t.T @ dz, db_i + dz.sum(axis=0), dw_h + h_prev.T @ dz
        dh_prev = dz @ w_h.T
        if truncate is not None:
            dh_prev = jnp.where((t > 0) & (t % truncate == 0), 0.0, dh_prev)
        return (dh_prev, dw_i, db_i, dw_h), dh

    zeros = lambda a: jnp.zeros_like(a)
    (_, dw_i, db_i, dw_h), dhs = lax.scan(
        backward_step, (dh_last, zeros(w_i), zeros(b_i), zeros(w_h)),
        (jnp.arange(steps), xs_t, h_prevs, hs), reverse=True)
    grads = {"cell": {"i": {"kernel": dw_i, "bias": db_i}, "h": {"kernel": dw_h}},
             "head": {"kernel": dw_o, "bias": db_o}}
    return loss, grads, jnp.swapaxes(dhs, 0, 1)


# ----------------------------------------------------------------------------- training

def train(model: RecurrentClassifier, params: dict, train_xy: tuple[jax.Array, jax.Array],
          val_xy: tuple[jax.Array, jax.Array], *, key: jax.Array, epochs: int,
          batch_size: int = 64, learning_rate: float = 1e-3, clip_norm: float | None = 1.0
          ) -> tuple[dict, list[dict[str, Any]]]:
    """Adam on BPTT gradients, clipped to a global norm of `clip_norm` (None: no clipping).

    Each epoch's order is a permutation from `fold_in(key, epoch)`; a trailing partial batch is
    dropped. An epoch is one compiled scan over its batches. Returns the final parameters and one
    record per epoch (train loss, validation loss and accuracy, seconds).
    """
    xs, ys = train_xy
    n = len(ys)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}.")
    steps = n // batch_size
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate)) \
        if clip_norm is not None else optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def run_epoch(params, opt_state, epoch_key):
        order = jax.random.permutation(epoch_key, n)

        def step(carry, s):
            params, opt_state = carry
            idx = lax.dynamic_slice_in_dim(order, s * batch_size, batch_size)
            loss, grads = jax.value_and_grad(model.loss)(params, xs[idx], ys[idx])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = lax.scan(step, (params, opt_state), jnp.arange(steps))
        return params, opt_state, losses.mean()

    @jax.jit
    def evaluate(params):
        logits = model.apply(params, val_xy[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, val_xy[1]).mean()
        return loss, jnp.mean(jnp.argmax(logits, axis=-1) == val_xy[1])

    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        params, opt_state, train_loss = run_epoch(params, opt_state, jax.random.fold_in(key, epoch))
        val_loss, val_acc = evaluate(params)
        record = {"epoch": epoch + 1, "train_loss": float(train_loss), "val_loss": float(val_loss),
                  "val_accuracy": float(val_acc)}  # float() syncs host and device once per epoch
        record["seconds"] = time.perf_counter() - start
        if not np.isfinite(record["train_loss"]):
            raise FloatingPointError(f"{model.cell}: training loss became {record['train_loss']} "
                                     f"in epoch {epoch + 1}; lower learning_rate or set clip_norm.")
        history.append(record)
    return params, history
