"""Which pixels a prediction rests on: vanilla gradient, SmoothGrad, Integrated Gradients, Grad-CAM.

The first three take any `logits_fn`, a pure function from model-space images (N, H, W, C) to
logits (N, K), so they do not care what the model is. Grad-CAM needs a layer, so it takes the
Flax model: it adds a zero tensor to that layer's output, or to the map a module reads (see
`capture.run_layers`), and reads the gradient with respect to it, as pytorch-grad-cam's hook on a
module's output does.

All of them return maps the size of the input; `heatmap` folds colour channels into one map.
They are pure: jit the caller (run eagerly, every op is dispatched on its own, seconds per call).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.report.plots import new_figure
from cnnjax.nn.capture import inference_variables, run_layers
from cnnjax.visualize.feature_maps import displayed

LogitsFn = Callable[[jax.Array], jax.Array]


def logits_fn(model: nn.Module, variables: Mapping[str, Any]) -> LogitsFn:
    """The model at inference as a plain function of model-space images."""
    return lambda images: model.apply(inference_variables(variables), images)


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


CAM_METHODS = ("gradcam", "gradcam++")


def grad_cam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array,
             layer: str, method: str = "gradcam") -> jax.Array:
    """Grad-CAM (Selvaraju et al., 2017) or Grad-CAM++ (Chattopadhay et al., 2018) on `layer`'s
    map A, upsampled to the input: (N, H, W).

    The map is ReLU(sum_k w_k A_k), resized bilinearly to the image. Grad-CAM's w_k is the
    spatially averaged gradient of the target logit with respect to A_k; Grad-CAM++ weighs each
    position's positive gradient by alpha = g^2 / (2 g^2 + sum(A_k) g^3), as pytorch-grad-cam does.
    Both assume A is rectified (a ReLU's output, e.g. 'pool2:in' for SeedCNN, see
    `capture.rectified_feature_layer`): on a pre-activation the weighted sum is mostly negative
    and the final ReLU leaves a speck.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {CAM_METHODS}, got {method!r}.")
    probe = run_layers(model, variables, images[:1], inputs=True)[1]
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
        g = grads[0]
        if method == "gradcam":
            weights = g.mean(axis=(0, 1))
        else:
            g2 = g ** 2
            alpha = g2 / (2 * g2 + acts.sum(axis=(0, 1)) * g2 * g + 1e-6)
            weights = (jnp.maximum(g, 0.0) * jnp.where(g != 0, alpha, 0.0)).sum(axis=(0, 1))
        cam = jax.nn.relu(jnp.tensordot(acts, weights, axes=1))
        return jax.image.resize(cam, x.shape[:2], "bilinear")

    return jax.vmap(one)(images, targets)


def reinitialized(model: nn.Module, variables: Mapping[str, Any], key: jax.Array,
                  example: jax.Array) -> dict[str, Any]:
    """`variables` with fresh parameters from the model's own initializers: the model of the
    model-randomization sanity check (Adebayo et al., 2018); other collections are kept.

    The init runs on an 'rbg' key made from `key`: any fresh draw serves, and XLA:CPU compiles an
    init on threefry keys in seconds, on rbg keys in well under one.
    """
    data = jax.random.key_data(key)
    rbg = jax.random.wrap_key_data(jnp.concatenate([data, data]).astype(jnp.uint32), impl="rbg")
    return {**variables, "params": _init(model, rbg, example)["params"]}


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key, example):
    return model.init(key, example)


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


def overlay_figure(images: np.ndarray, maps: Mapping[str, np.ndarray], row_titles: list[str]):
    """Rows of examples: the input (RGB for three channels), then each method's map as a heat
    overlay on its grey version, so the heat's colours are not confused with the image's.

    `images` is (N, H, W, C) in display range [0, 1]; each map (N, H, W) is scaled to its own
    example's maximum, so the colours compare pixels within a map, not across methods.
    """
    n, cols = len(images), 1 + len(maps)
    fig, axes = new_figure(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    gray = images.mean(axis=-1)
    for i in range(n):
        pixels, cmap = displayed(images[i])
        axes[i, 0].imshow(pixels, cmap=cmap, vmin=0, vmax=1)
        axes[i, 0].set_title(row_titles[i], fontsize=8)
        for j, (name, m) in enumerate(maps.items(), start=1):
            m_i = np.asarray(m[i], np.float64)
            top = m_i.max()
            axes[i, j].imshow(gray[i], cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(m_i / top if top > 0 else m_i, cmap="jet", alpha=0.55, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    return fig
