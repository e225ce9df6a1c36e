"""Which pixels a prediction rests on: vanilla gradient, SmoothGrad, Integrated Gradients, Grad-CAM.

The first three take any `logits_fn`, a pure function from model-space images (N, H, W, C) to
logits (N, K), so they do not care what the model is. Grad-CAM needs a layer, so it takes the
Flax model: it adds a zero tensor to that layer's output (see `capture.run_layers`) and reads the
gradient with respect to it, as pytorch-grad-cam's hook on a module's output does.

All of them return maps the size of the input; `heatmap` folds colour channels into one map.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.visualize.capture import run_layers

LogitsFn = Callable[[jax.Array], jax.Array]


def logits_fn(model: nn.Module, variables: Mapping[str, Any]) -> LogitsFn:
    """The model at inference as a plain function of model-space images."""
    return lambda images: run_layers(model, variables, images)[0]


def _target_logit(fn: LogitsFn, target: jax.Array):
    """(H, W, C) image -> the `target` logit, for one example."""
    return lambda x: fn(x[None])[0, target]


def gradient(fn: LogitsFn, images: jax.Array, targets: jax.Array) -> jax.Array:
    """d logit[target] / d image for each example: (N, H, W, C)."""
    return jax.vmap(lambda x, t: jax.grad(_target_logit(fn, t))(x))(images, targets)


def smoothgrad(fn: LogitsFn, images: jax.Array, targets: jax.Array, key: jax.Array,
               samples: int = 32, noise: float = 0.15) -> jax.Array:
    """Mean gradient over `samples` noisy copies (Smilkov et al., 2017).

    `noise` is the Gaussian's std as a fraction of each image's value range (their 10-20%); the
    average removes the gradient's pixel-to-pixel jitter that a ReLU network's kinks produce.
    """
    if samples <= 0 or noise < 0:
        raise ValueError(f"smoothgrad needs samples > 0 and noise >= 0, got {samples} and {noise}.")

    def one(x, t, k):
        sigma = noise * (x.max() - x.min())
        eps = sigma * jax.random.normal(k, (samples, *x.shape))
        return jax.vmap(jax.grad(_target_logit(fn, t)))(x + eps).mean(0)

    return jax.vmap(one)(images, targets, jax.random.split(key, len(images)))


def integrated_gradients(fn: LogitsFn, images: jax.Array, targets: jax.Array,
                         baselines: jax.Array, steps: int = 128) -> jax.Array:
    """(x - x') times the path-averaged gradient from x' to x (Sundararajan et al., 2017).

    The path integral is taken with the trapezoidal rule over `steps` intervals; by completeness
    the attributions of an example sum to logit(x) - logit(x'), which `completeness_gap` checks.
    """
    if steps <= 0:
        raise ValueError(f"integrated_gradients needs steps > 0, got {steps}.")
    alphas = jnp.linspace(0.0, 1.0, steps + 1)
    weights = jnp.full(steps + 1, 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)

    def one(x, base, t):
        path = base + alphas[:, None, None, None] * (x - base)
        grads = jax.vmap(jax.grad(_target_logit(fn, t)))(path)
        return (x - base) * jnp.tensordot(weights, grads, axes=1)

    baselines = jnp.broadcast_to(baselines, images.shape)
    return jax.vmap(one)(images, baselines, targets)


def completeness_gap(fn: LogitsFn, images: jax.Array, targets: jax.Array, baselines: jax.Array,
                     attributions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of attributions, logit(x) - logit(x')) per example; equal for exact IG."""
    baselines = jnp.broadcast_to(baselines, images.shape)
    rows = jnp.arange(len(images))
    diff = fn(images)[rows, targets] - fn(baselines)[rows, targets]
    return attributions.reshape(len(images), -1).sum(-1), diff


def grad_cam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array,
             layer: str) -> jax.Array:
    """Grad-CAM (Selvaraju et al., 2017) on `layer`'s output, upsampled to the input: (N, H, W).

    Channel weights are the spatially averaged gradients of the target logit with respect to the
    layer's output A; the map is ReLU(sum_k weight_k A_k), resized bilinearly to the image.
    """
    probe = run_layers(model, variables, images[:1])[1]
    if layer not in probe or probe[layer].ndim != 4:
        maps = [n for n, o in probe.items() if o.ndim == 4]
        raise ValueError(f"Grad-CAM needs a spatial layer; {layer!r} is not one of "
                         f"{', '.join(maps)}.")

    def one(x, t):
        def logit(delta):
            logits, outputs = run_layers(model, variables, x[None], add={layer: delta})
            return logits[0, t], outputs[layer][0]

        zero = jnp.zeros(probe[layer].shape[1:], images.dtype)[None]
        grads, acts = jax.grad(logit, has_aux=True)(zero)
        weights = grads[0].mean(axis=(0, 1))
        cam = jax.nn.relu(jnp.tensordot(acts, weights, axes=1))
        return jax.image.resize(cam, x.shape[:2], "bilinear")

    return jax.vmap(one)(images, targets)


def heatmap(attributions: jax.Array) -> jax.Array:
    """(N, H, W, C) attributions -> (N, H, W) magnitudes: the max |value| over colour channels."""
    return jnp.abs(attributions).max(axis=-1)


def _average_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a, b) -> float:
    """Rank correlation of two equally shaped maps; ties (a ReLU net's many zero gradients) share
    their average rank, so shared zeros do not count as agreement."""
    ra, rb = _average_ranks(np.ravel(a)), _average_ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0
