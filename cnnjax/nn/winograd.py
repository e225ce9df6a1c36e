"""Winograd F(m x m, 3 x 3) convolutions for stride-1 3x3 layers: fewer multiplications per output.

A stride-1 3x3 convolution computes each m x m block of outputs from an (m+2) x (m+2) input tile.
Winograd's minimal filtering (Lavin & Gray 2015) transforms the tile (B^T d B) and the kernel
(G w G^T) into (m+2)^2 positions where the convolution is an elementwise product summed over input
channels, i.e. (m+2)^2 independent (tiles, in) @ (in, out) matrix products, then folds the result
back with A^T . A. F(2x2, 3x3) needs 16 products per 4 outputs where the direct form needs 36
(2.25x fewer FLOPs); F(4x4, 3x3) 36 per 16 (4x) but its transforms' larger coefficients cost
rounding (tests/test_winograd.py bounds both against `lax.conv_general_dilated`).

The transforms are constant linear combinations of strided slices, which XLA fuses into one loop
each; the core is one batched `dot_general` over the positions, which XLA:CPU runs as GEMMs.
Both gradients reuse the same pieces (cnnjax/nn/conv.py's `jax.custom_vjp` picks them per pass):
  input gradient:  a Winograd convolution of the output gradient with the flipped, transposed
                   kernel;
  kernel gradient: G^T [V^T @ (A g A^T per output tile)] G, one batched product contracting
                   over the tiles, where V is the forward pass's transformed input (its residual).
On 2 XLA:CPU cores the seed CNN's conv2 (32 -> 64 channels) ran slower this way than by XLA's
Eigen convolutions in every training pass (its 32-channel products are memory-bound), faster
than XLA's YNNPACK convolutions at up to 32 rows: 'auto' uses it for that inference only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]

# (B^T, G, A^T) for F(m, 3), Lavin & Gray's interpolation points (0, ±1; 0, ±1, ±2 for m=4).
_MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float64)),
}
TILES = tuple(_MATRICES)


def _combine(parts: list[jax.Array], matrix: np.ndarray) -> list[jax.Array]:
    """[sum_j matrix[i, j] * parts[j] for each row i], skipping zero coefficients."""
    out = []
    for row in matrix:
        terms = [(float(c), p) for c, p in zip(row, parts) if c != 0]
        acc = None
        for c, p in terms:
            t = p if c == 1 else -p if c == -1 else c * p
            acc = t if acc is None else acc + t
        out.append(acc)
    return out


def _tiles(n: int, m: int) -> int:
    return -(-n // m)


def transform_input(x: jax.Array, padding: Pads, m: int) -> jax.Array:
    """NHWC input -> V, (alpha^2, N*th*tw, C): each tile's B^T d B, tiles of stride m."""
    bt = _MATRICES[m][0]
    alpha = m + 2
    n, h, w, c = x.shape
    oh, ow = h + sum(padding[0]) - 2, w + sum(padding[1]) - 2
    th, tw = _tiles(oh, m), _tiles(ow, m)
    # pad (or crop: lax.pad takes negative widths) so the tiles cover exactly m*th + 2 rows
    (pt, _), (pl, _) = padding
    cfg = [(0, 0, 0), (pt, m * th + 2 - h - pt, 0), (pl, m * tw + 2 - w - pl, 0), (0, 0, 0)]
    xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    rows = [xp[:, a:a + m * th:m] for a in range(alpha)]  # (N, th, W', C): row a of every tile
    rows = _combine(rows, bt)
    out = []
    for r in rows:
        cols = _combine([r[:, :, b:b + m * tw:m] for b in range(alpha)], bt)
        out.extend(cols)
    return jnp.stack(out).reshape(alpha * alpha, n * th * tw, c)


def transform_kernel(kernel: jax.Array, m: int) -> jax.Array:
    """HWIO 3x3 kernel -> U, (alpha^2, in, out) = G w G^T per (in, out)."""
    g = jnp.asarray(_MATRICES[m][1], kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=lax.Precision.HIGHEST)
    return u.reshape(-1, *kernel.shape[2:])


def transform_output(mt: jax.Array, n: int, oh: int, ow: int, m: int) -> jax.Array:
    """(alpha^2, N*th*tw, out) products -> NHWC output: A^T M A per tile, tiles interleaved."""
    at = _MATRICES[m][2]
    alpha, th, tw, cout = m + 2, _tiles(oh, m), _tiles(ow, m), mt.shape[-1]
    mt = mt.reshape(alpha, alpha, n, th, tw, cout)
    rows = _combine([mt[a] for a in range(alpha)], at)  # m x (alpha, N, th, tw, out)
    y = jnp.stack([jnp.stack(_combine([r[b] for b in range(alpha)], at)) for r in rows])
    # (m_i, m_j, N, th, tw, out) -> (N, th, m_i, tw, m_j, out) -> (N, m*th, m*tw, out)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, m * th, m * tw, cout)
    return y[:, :oh, :ow]


def transform_output_grad(g: jax.Array, m: int) -> jax.Array:
    """The transpose of `transform_output`: NHWC output gradient -> (alpha^2, N*th*tw, out)."""
    a = _MATRICES[m][2].T  # (alpha, m)
    n, oh, ow, cout = g.shape
    th, tw = _tiles(oh, m), _tiles(ow, m)
    g = jnp.pad(g, ((0, 0), (0, m * th - oh), (0, m * tw - ow), (0, 0)))
    g = g.reshape(n, th, m, tw, m, cout)
    rows = _combine([g[:, :, i] for i in range(m)], a)  # alpha x (N, th, tw, m_j, out)
    out = []
    for r in rows:
        out.extend(_combine([r[:, :, :, j] for j in range(m)], a))
    return jnp.stack(out).reshape((m + 2) ** 2, n * th * tw, cout)


def _product(v: jax.Array, u: jax.Array) -> jax.Array:
    """(P, T, in) @ (P, in, out) -> (P, T, out): the one batched matrix product."""
    return lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))


def forward(x: jax.Array, kernel: jax.Array, padding: Pads, m: int) -> tuple[jax.Array, jax.Array]:
    """Stride-1 3x3 NHWC x HWIO convolution by F(m x m, 3 x 3), and V (the kernel gradient's
    input)."""
    n, h, w, _ = x.shape
    oh, ow = h + sum(padding[0]) - 2, w + sum(padding[1]) - 2
    v = transform_input(x, padding, m)
    return transform_output(_product(v, transform_kernel(kernel, m)), n, oh, ow, m), v


def input_grad(g: jax.Array, kernel: jax.Array, padding: Pads, m: int) -> jax.Array:
    """dL/dx: the output gradient convolved (by Winograd) with the flipped, transposed kernel."""
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
    return forward(g, flipped, tuple((2 - lo, 2 - hi) for lo, hi in padding), m)[0]


def kernel_grad(v: jax.Array, g: jax.Array, m: int) -> jax.Array:
    """dL/dkernel (3, 3, in, out) from the transformed input V and the output gradient."""
    dm = transform_output_grad(g, m)
    du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))  # (P, in, out): sums over tiles
    alpha = m + 2
    du = du.reshape(alpha, alpha, *du.shape[1:])
    gm = jnp.asarray(_MATRICES[m][1], du.dtype)
    return jnp.einsum("ai,abco,bj->ijco", gm, du, gm, precision=lax.Precision.HIGHEST)
