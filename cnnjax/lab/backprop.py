"""Backpropagation by hand: each layer's forward pass, and the backward pass derived from it.

Notation of the seed text: z^l = W^l a^{l-1} + b^l, a^l = σ(z^l), δ^l = ∂C/∂z^l. The four
equations of backpropagation are

    (BP1) δ^L = ∇_a C ⊙ σ'(z^L)                   the output error
    (BP2) δ^l = ((W^{l+1})^T δ^{l+1}) ⊙ σ'(z^l)    the error of a layer from the next one's
    (BP3) ∂C/∂b^l = δ^l                          summed over the batch
    (BP4) ∂C/∂W^l = a^{l-1} (δ^l)^T                summed over the batch

Arrays are batches of row vectors laid out as Flax lays them out (dense kernels (in, out), images
NHWC, conv kernels HWIO), so W^T δ reads `delta @ kernel.T`. BP2 is split in two halves that
chain: a weight layer's backward takes δ at its output to the error at its input, (W)^T δ for a
dense layer, the transposed convolution for a conv, routing for a pool; an activation's backward
multiplies by σ'(z). For softmax with cross-entropy BP1 collapses to (softmax(z^L) - onehot(y)) / N.

Nothing here calls `jax.grad`, `jax.vjp` or any other autodiff: the tests compare these gradients
with autodiff and finite differences, so they must be derived independently of both.

Convolutions and pools go through im2col: `_patches` gathers every window into an
(N, OH, OW, KH, KW, C) array, and `_fold` is its exact transpose, sending each window position's
error back to the pixel it read. The backward passes are then einsums and one fold.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.nn.geometry import Padding, explicit_padding, output_size
from cnnjax.nn.models import SeedCNN

Pair = tuple[int, int]
# One padding for both spatial axes (as cnnjax.nn.geometry reads it), or one (lo, hi) pair per axis.
ConvPadding = Union[Padding, Sequence[Sequence[int]]]


# ----------------------------------------------------------------------------- window geometry

def _pair(value: int | Sequence[int], what: str, layer: str) -> Pair:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v <= 0 for v in pair):
        raise ValueError(f"{layer}: {what} must be a positive int or a pair of them, "
                         f"got {value!r}.")
    return pair


def resolve_padding(padding: ConvPadding, window: Pair, stride: Pair, hw: Pair, layer: str
                     ) -> tuple[Pair, Pair]:
    """((lo, hi), (lo, hi)): the zero padding of each spatial axis, from any padding form accepted.

    One form for both axes ('valid', 'same', P, (lo, hi)) is resolved per axis by
    `cnnjax.nn.geometry.explicit_padding`; two (lo, hi) pairs are taken as they are, one per axis.
    """
    per_axis = (not isinstance(padding, (str, int)) and len(padding) == 2
                and all(not isinstance(p, int) for p in padding))
    paddings = tuple(padding) if per_axis else (padding, padding)
    return tuple(explicit_padding(p, k, s, n, layer)
                 for p, k, s, n in zip(paddings, window, stride, hw))


def _geometry(x: jax.Array, window, stride, padding, layer: str):
    """Resolved window, stride, padding and output size; raises naming `layer`, before tracing."""
    if x.ndim != 4:
        raise ValueError(f"{layer}: expected an NHWC array of rank 4, got shape {x.shape}.")
    window, stride = _pair(window, "window", layer), _pair(stride, "stride", layer)
    pads = resolve_padding(padding, window, stride, x.shape[1:3], layer)
    out = tuple(output_size(n, k, s, p, layer)
                for n, k, s, p in zip(x.shape[1:3], window, stride, pads))
    return window, stride, pads, out


def _pad(x: jax.Array, pads: tuple[Pair, Pair], fill: float) -> jax.Array:
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)


def _patches(xp: jax.Array, window: Pair, stride: Pair, out: Pair) -> jax.Array:
    """im2col: padded (N, Hp, Wp, C) -> (N, OH, OW, KH, KW, C), every window the layer reads."""
    (kh, kw), (sh, sw), (oh, ow) = window, stride, out
    rows = [jnp.stack([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                       for j in range(kw)], axis=3) for i in range(kh)]
    return jnp.stack(rows, axis=3)


def _fold(dpatches: jax.Array, padded_hw: Pair, stride: Pair) -> jax.Array:
    """The transpose of `_patches`: sums each window position's error into the pixel it came from.

    Window offset (i, j) read the pixels i, i + sh, i + 2 sh, ... of the padded input; padding the
    (N, OH, OW, C) error with sh - 1 interior zeros and i leading zeros puts it back on them.
    """
    n, oh, ow, kh, kw, c = dpatches.shape
    (hp, wp), (sh, sw) = padded_hw, stride
    total = jnp.zeros((n, hp, wp, c), dpatches.dtype)
    for i in range(kh):
        for j in range(kw):
            config = ((0, 0, 0), (i, hp - i - sh * (oh - 1) - 1, sh - 1),
                      (j, wp - j - sw * (ow - 1) - 1, sw - 1), (0, 0, 0))
            total = total + lax.pad(dpatches[:, :, :, i, j, :], jnp.zeros((), dpatches.dtype),
                                    config)
    return total


def _crop(xp: jax.Array, pads: tuple[Pair, Pair], hw: Pair) -> jax.Array:
    (top, _), (left, _) = pads
    return xp[:, top:top + hw[0], left:left + hw[1], :]


# ----------------------------------------------------------------------------- dense

def dense_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """z = x W + b for a batch of row vectors: x (N, in), kernel (in, out), bias (out,)."""
    return x @ kernel + bias


def dense_backward(x: jax.Array, kernel: jax.Array, delta: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(∂C/∂x, ∂C/∂W, ∂C/∂b) from δ = ∂C/∂z: BP2's W^T δ, BP4 and BP3, summed over the batch."""
    return delta @ kernel.T, x.T @ delta, delta.sum(axis=0)


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int | Pair = 1,
                   padding: ConvPadding = 0, layer: str = "conv2d") -> jax.Array:
    """Cross-correlation as `flax.linen.Conv` computes it: x (N, H, W, C), kernel (KH, KW, C, O).

    `padding` is 'valid', 'same', P, (lo, hi) for both axes, or ((lo, hi), (lo, hi)) per axis.
    """
    window, stride, pads, out = _geometry(x, kernel.shape[:2], stride, padding, layer)
    patches = _patches(_pad(x, pads, 0.0), window, stride, out)
    return jnp.einsum("nhwijc,ijco->nhwo", patches, kernel) + bias


def conv2d_backward(x: jax.Array, kernel: jax.Array, delta: jax.Array, stride: int | Pair = 1,
                    padding: ConvPadding = 0, layer: str = "conv2d"
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(∂C/∂x, ∂C/∂kernel, ∂C/∂bias) from δ = ∂C/∂z of shape (N, OH, OW, O).

    Each output z[n, h, w, o] = Σ_ijc patch[n, h, w, i, j, c] kernel[i, j, c, o] + b[o] is a dense
    layer applied to one window, with the kernel shared by all windows, so BP3/BP4 sum over windows
    too, and BP2's W^T δ gives each window's error, which `_fold` adds back onto the input pixels.
    """
    window, stride, pads, out = _geometry(x, kernel.shape[:2], stride, padding, layer)
    xp = _pad(x, pads, 0.0)
    patches = _patches(xp, window, stride, out)
    dkernel = jnp.einsum("nhwijc,nhwo->ijco", patches, delta)
    dpatches = jnp.einsum("nhwo,ijco->nhwijc", delta, kernel)
    dx = _crop(_fold(dpatches, xp.shape[1:3], stride), pads, x.shape[1:3])
    return dx, dkernel, delta.sum(axis=(0, 1, 2))


# ----------------------------------------------------------------------------- pooling

def max_pool_forward(x: jax.Array, window: int | Pair = 2, stride: int | Pair | None = None,
                     padding: ConvPadding = 0, layer: str = "max_pool") -> jax.Array:
    """Max of each window; padding counts as -inf, a trailing remainder is dropped (floor mode)."""
    stride = window if stride is None else stride
    window, stride, pads, out = _geometry(x, window, stride, padding, layer)
    return _patches(_pad(x, pads, -jnp.inf), window, stride, out).max(axis=(3, 4))


def max_pool_backward(x: jax.Array, delta: jax.Array, window: int | Pair = 2,
                      stride: int | Pair | None = None, padding: ConvPadding = 0,
                      layer: str = "max_pool") -> jax.Array:
    """∂C/∂x: each window's error goes to the input that won it (the first one on a tie).

    The max is locally the identity on its winner and constant in the others, so σ' is a one-hot
    mask per window. Overlapping windows add up where they share a winner.
    """
    stride = window if stride is None else stride
    window, stride, pads, out = _geometry(x, window, stride, padding, layer)
    xp = _pad(x, pads, -jnp.inf)
    patches = _patches(xp, window, stride, out)
    n, oh, ow, kh, kw, c = patches.shape
    winner = jnp.argmax(patches.reshape(n, oh, ow, kh * kw, c), axis=3)
    mask = jax.nn.one_hot(winner, kh * kw, axis=3, dtype=delta.dtype)
    dpatches = (mask * delta[:, :, :, None, :]).reshape(patches.shape)
    return _crop(_fold(dpatches, xp.shape[1:3], stride), pads, x.shape[1:3])


def avg_pool_forward(x: jax.Array, window: int | Pair = 2, stride: int | Pair | None = None,
                     padding: ConvPadding = 0, layer: str = "avg_pool") -> jax.Array:
    """Mean of each window; padded zeros count (count_include_pad=True, as in cnnjax.nn.layers)."""
    stride = window if stride is None else stride
    window, stride, pads, out = _geometry(x, window, stride, padding, layer)
    return _patches(_pad(x, pads, 0.0), window, stride, out).mean(axis=(3, 4))


def avg_pool_backward(x: jax.Array, delta: jax.Array, window: int | Pair = 2,
                      stride: int | Pair | None = None, padding: ConvPadding = 0,
                      layer: str = "avg_pool") -> jax.Array:
    """∂C/∂x: each window's error is shared equally by its KH·KW inputs, padding included."""
    stride = window if stride is None else stride
    window, stride, pads, out = _geometry(x, window, stride, padding, layer)
    share = delta / (window[0] * window[1])
    dpatches = jnp.broadcast_to(share[:, :, :, None, None, :], (*share.shape[:3], *window,
                                                                share.shape[3]))
    hp, wp = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    return _crop(_fold(dpatches, (hp, wp), stride), pads, x.shape[1:3])


# ----------------------------------------------------------------------------- activations

def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def _sigmoid_prime(z):
    s = _sigmoid(z)
    return s * (1.0 - s)


# name -> (σ, σ'). ReLU's derivative at 0 is taken as 0, the convention autodiff uses too.
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "relu": (lambda z: jnp.maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "sigmoid": (_sigmoid, _sigmoid_prime),
    "tanh": (jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2),
    "identity": (lambda z: z, jnp.ones_like),
}


def _activation(kind: str) -> tuple[Callable, Callable]:
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown activation {kind!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[kind]


def activation_forward(z: jax.Array, kind: str) -> jax.Array:
    return _activation(kind)[0](z)


def activation_backward(z: jax.Array, delta: jax.Array, kind: str) -> jax.Array:
    """∂C/∂z = ∂C/∂a ⊙ σ'(z): the second half of BP2 (and of BP1 at the output)."""
    return delta * _activation(kind)[1](z)


# ----------------------------------------------------------------------------- losses

def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of -log softmax(z)[y]; labels are integer classes."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(log_norm - picked)


def softmax_cross_entropy_delta(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """δ^L = (softmax(z) - onehot(y)) / N: BP1 with the softmax's Jacobian already folded in."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return (jax.nn.softmax(logits, axis=-1) - onehot) / logits.shape[0]


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over all elements of (a - y)^2, the quadratic cost of the seed's XOR network."""
    return jnp.mean((outputs - targets) ** 2)


def mse_grad(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """∇_a C = 2 (a - y) / size; the output activation's backward then applies BP1's ⊙ σ'(z^L)."""
    return 2.0 * (outputs - targets) / outputs.size


# name -> (loss(outputs, targets), ∂loss/∂outputs).
LOSSES: dict[str, tuple[Callable, Callable]] = {
    "softmax_cross_entropy": (softmax_cross_entropy, softmax_cross_entropy_delta),
    "mse": (mse, mse_grad),
}


# ----------------------------------------------------------------------------- layers that chain

@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer whose parameters sit under `name` in the params tree, as flax names them."""

    name: str

    def forward(self, params, x):
        return dense_forward(x, params["kernel"], params["bias"]), x

    def backward(self, params, x, delta):
        dx, dkernel, dbias = dense_backward(x, params["kernel"], delta)
        return dx, {"kernel": dkernel, "bias": dbias}


@dataclasses.dataclass(frozen=True)
class Conv2d:
    name: str
    stride: int | Pair = 1
    padding: ConvPadding = 0

    def forward(self, params, x):
        return conv2d_forward(x, params["kernel"], params["bias"], self.stride, self.padding,
                              self.name), x

    def backward(self, params, x, delta):
        dx, dkernel, dbias = conv2d_backward(x, params["kernel"], delta, self.stride,
                                             self.padding, self.name)
        return dx, {"kernel": dkernel, "bias": dbias}


@dataclasses.dataclass(frozen=True)
class Pool:
    kind: str = "max"  # 'max' or 'avg'
    window: int | Pair = 2
    stride: int | Pair | None = None
    padding: ConvPadding = 0
    name: str | None = None

    def _fns(self):
        fns = {"max": (max_pool_forward, max_pool_backward),
               "avg": (avg_pool_forward, avg_pool_backward)}
        if self.kind not in fns:
            raise ValueError(f"pool kind must be 'max' or 'avg', got {self.kind!r}.")
        return fns[self.kind]

    def forward(self, params, x):
        return self._fns()[0](x, self.window, self.stride, self.padding, self.name or "pool"), x

    def backward(self, params, x, delta):
        return self._fns()[1](x, delta, self.window, self.stride, self.padding,
                              self.name or "pool"), None


@dataclasses.dataclass(frozen=True)
class Activation:
    kind: str
    name: str | None = None

    def forward(self, params, z):
        return activation_forward(z, self.kind), z

    def backward(self, params, z, delta):
        return activation_backward(z, delta, self.kind), None


@dataclasses.dataclass(frozen=True)
class Flatten:
    """(N, ...) -> (N, features) in NHWC order, as `cnnjax.nn.layers.flatten`."""

    name: str | None = None

    def forward(self, params, x):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, shape, delta):
        return delta.reshape(shape), None


Layer = Union[Dense, Conv2d, Pool, Activation, Flatten]


def forward(layers: Sequence[Layer], params: dict, x: jax.Array) -> tuple[jax.Array, list]:
    """Runs the chain, keeping what each layer's backward needs (its input; z for activations)."""
    caches = []
    for layer in layers:
        x, cache = layer.forward(params.get(layer.name) if layer.name else None, x)
        caches.append(cache)
    return x, caches


def backward(layers: Sequence[Layer], params: dict, caches: Sequence, delta: jax.Array) -> dict:
    """Walks the chain from the output error back to the first layer (BP2), collecting BP3/BP4.

    Returns the gradient as a tree shaped like the parameters of the layers that have them.
    """
    grads = {}
    for layer, cache in zip(reversed(layers), reversed(caches)):
        delta, layer_grads = layer.backward(params.get(layer.name) if layer.name else None,
                                            cache, delta)
        if layer_grads is not None:
            grads[layer.name] = layer_grads
    return grads


def loss_and_grad(layers: Sequence[Layer], params: dict, x: jax.Array, targets: jax.Array,
                  loss: str = "softmax_cross_entropy") -> tuple[jax.Array, dict]:
    """(C, ∂C/∂params) for a chain of layers and a loss from `LOSSES`, by BP1-BP4."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}.")
    loss_fn, output_grad = LOSSES[loss]
    outputs, caches = forward(layers, params, x)
    grads = backward(layers, params, caches, output_grad(outputs, targets))
    return loss_fn(outputs, targets), grads


# ----------------------------------------------------------------------------- models as chains

class MLP(nn.Module):
    """Dense layers dense1, dense2, ... with one activation after each (the last may differ).

    The seed's XOR network is `MLP((2, 1), 'sigmoid', 'sigmoid')`; a classifier leaves the output
    activation 'identity' and feeds the logits to softmax cross-entropy.
    """

    features: Sequence[int]
    activation: str = "sigmoid"
    output_activation: str = "identity"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features, start=1):
            kind = self.output_activation if i == len(self.features) else self.activation
            x = activation_forward(nn.Dense(width, name=f"dense{i}")(x), kind)
        return x


def mlp_layers(model: MLP) -> tuple[Layer, ...]:
    """The chain that computes `model` (an `MLP`), with layer names matching its params tree."""
    layers: list[Layer] = [Flatten()]
    for i in range(1, len(model.features) + 1):
        kind = model.output_activation if i == len(model.features) else model.activation
        layers += [Dense(f"dense{i}"), Activation(kind)]
    return tuple(layers)


def seed_cnn_layers(model: nn.Module) -> tuple[Layer, ...]:
    """The chain that computes a `cnnjax.nn.models.SeedCNN` in evaluation mode, named as its params.

    Dropout is the identity in evaluation mode, so the gradient is that of `model.apply(v, x)`.
    Batch norm is not written out here: a model with `batch_norm=True` raises.
    """
    if getattr(model, "batch_norm", False):
        raise ValueError("seed_cnn_layers: batch norm has no hand-written backward pass here; "
                         "build the SeedCNN with batch_norm=False.")
    layers: list[Layer] = []
    for i, _ in enumerate(model.features, start=1):
        layers += [Conv2d(f"conv{i}", model.stride, model.padding), Activation("relu"),
                   Pool(model.pool, model.pool_size, model.pool_stride or model.pool_size, 0,
                        name=f"pool{i}")]
    layers.append(Flatten())
    for i, _ in enumerate(model.dense, start=1):
        layers += [Dense(f"fc{i}"), Activation("relu")]
    layers.append(Dense(f"fc{len(model.dense) + 1}"))
    return tuple(layers)


def seed_cnn_loss_and_grad(model: nn.Module, params: dict, images: jax.Array, labels: jax.Array
                           ) -> tuple[jax.Array, dict]:
    """Mean softmax cross-entropy of a SeedCNN on (N, H, W, C) images and its gradient, by hand.

    `params` is the model's 'params' collection; the gradient has the same tree structure.
    """
    return loss_and_grad(seed_cnn_layers(model), params, images, labels, "softmax_cross_entropy")


def model_loss_and_grad(model: nn.Module, params: dict, x: jax.Array, targets: jax.Array,
                        loss: str = "softmax_cross_entropy") -> tuple[jax.Array, dict]:
    """Hand-written (loss, gradient) for the models this module can write out: MLP and SeedCNN."""
    if isinstance(model, MLP):
        return loss_and_grad(mlp_layers(model), params, x, targets, loss)
    if isinstance(model, SeedCNN):
        return loss_and_grad(seed_cnn_layers(model), params, x, targets, loss)
    raise ValueError(f"no hand-written backward pass for {type(model).__name__}; build the chain "
                     f"of layers yourself and call backprop.loss_and_grad.")

