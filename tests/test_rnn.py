"""Recurrent classifiers: hand-written BPTT against autodiff through `lax.scan`, finite differences.

The reference for every gradient is `jax.grad` through the Flax cells scanned over time, or
central differences of the loss; `elman_bptt` shares no code with either beyond the forward
equations. Sizes are small: each test compiles a few scans of a handful of steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from cnnjax.data import datasets
from cnnjax.lab import rnn
from cnnjax.lab.gradcheck import check_gradients


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| over whole arrays or whole parameter trees."""
    a, b = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def batch(n=5, steps=7, features=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, steps, features)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def random_params(model, features, seed=1):
    """Parameters at a random point of the model's shapes (biases nonzero), without a Flax init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: model.init(key, features), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), jnp.float32),
                        shapes)


@pytest.mark.parametrize("truncate", [None, 3])
def test_hand_written_elman_bptt_equals_jax_grad_through_the_scan(truncate):
    model = rnn.RecurrentClassifier("rnn", hidden=6, truncate=truncate)
    xs, ys = batch()
    params = random_params(model, xs.shape[-1])
    loss, grads = jax.jit(jax.value_and_grad(model.loss))(params, xs, ys)
    hand_loss, hand_grads, hand_dh = jax.jit(rnn.elman_bptt, static_argnums=3)(params, xs, ys,
                                                                                truncate)
    assert rel_error(hand_loss, loss) <= 1e-6
    assert jax.tree.structure(hand_grads) == jax.tree.structure(grads)
    errors = jax.tree.map(rel_error, hand_grads, grads)
    assert max(jax.tree.leaves(errors)) <= 1e-5, errors
    # ∂L/∂h_t at every step, against autodiff through zero taps added to each h_t.
    assert rel_error(hand_dh, jax.jit(rnn.hidden_grads, static_argnums=0)(model, params, xs, ys)
                     ) <= 1e-5


def test_finite_differences_agree_with_hand_written_bptt():
    xs, ys = batch(n=3, steps=5)
    model = rnn.RecurrentClassifier("rnn", hidden=4)
    params = random_params(model, xs.shape[-1])
    report = check_gradients(lambda p: model.loss(p, xs, ys), params, key=jax.random.key(0),
                             grad_fn=lambda p: rnn.elman_bptt(p, xs, ys)[1])
    assert report.passed(1e-5), report.table()


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_truncation_beyond_the_sequence_is_full_bptt_and_short_truncation_cuts_the_gradient(cell):
    xs, ys = batch(steps=6)
    full = rnn.RecurrentClassifier(cell, hidden=5)
    params = random_params(full, xs.shape[-1])
    taps = jnp.zeros((*xs.shape[:2], 5))

    def grads(model):  # (∂L/∂params, ∂L/∂h_t) in one compile
        return jax.jit(jax.grad(model.loss, argnums=(0, 3)))(params, xs, ys, taps)

    reference, reference_dh = grads(full)
    # k = 6 puts the first cut at step 7, past the end: truncation is inactive.
    same, same_dh = grads(rnn.RecurrentClassifier(cell, 5, truncate=6))
    assert rel_error(same, reference) == 0.0 and rel_error(same_dh, reference_dh) == 0.0
    # k = 2 cuts the carry entering steps 3 and 5 (1-based): no gradient reaches h_1..h_4.
    truncated, truncated_dh = grads(rnn.RecurrentClassifier(cell, 5, truncate=2))
    assert rel_error(truncated["cell"], reference["cell"]) > 1e-3
    assert float(jnp.abs(truncated_dh[:, :4]).max()) == 0.0
    assert bool((jnp.abs(truncated_dh[:, 4:]).max(axis=(0, 2)) > 0).all())
    assert rel_error(truncated_dh[:, 4:], reference_dh[:, 4:]) < 1e-6  # the uncut tail is exact
    # The readout sees only the last hidden state, whose value truncation does not change.
    assert rel_error(truncated["head"], reference["head"]) < 1e-6


def test_sequences_are_the_rows_of_each_image_normalized():
    images = np.zeros((2, 28, 28, 1), np.uint8)
    images[1, 5, :, 0] = 255  # row 5 of the second digit is white
    xs = rnn.sequences(images, 0.5, 0.25)
    assert xs.shape == (2, 28, 28) and xs.dtype == jnp.float32
    np.testing.assert_allclose(xs[1, 5], np.full(28, (1.0 - 0.5) / 0.25))
    np.testing.assert_allclose(xs[1, 4], np.full(28, -2.0))


def test_lstm_learns_sequential_digits_in_a_few_seconds():
    images, labels = datasets.load("mnist5k", "train")
    spec = datasets.get_spec("mnist5k")
    pick = np.random.default_rng(0).permutation(len(labels))[:600]  # the split is sorted by class
    xs, ys = rnn.sequences(images[pick], spec.mean, spec.std), jnp.asarray(labels[pick])
    model = rnn.RecurrentClassifier("lstm", hidden=32)
    params = model.init(jax.random.key(0), 28)
    _, history = rnn.train(model, params, (xs[:400], ys[:400]), (xs[400:], ys[400:]),
                           key=jax.random.key(1), epochs=3, batch_size=20, learning_rate=1e-2)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.3  # chance is 0.1; this run gets about 0.5


@pytest.mark.parametrize("kwargs, needle", [
    ({"cell": "gru"}, "'lstm', 'rnn'"),
    ({"truncate": 0}, "truncate"),
    ({"hidden": 0}, "hidden"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        rnn.RecurrentClassifier(**kwargs)
