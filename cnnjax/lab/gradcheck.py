"""Gradient checking by central differences, for any parameter tree and any scalar loss.

    report = check_gradients(lambda p: loss(model.apply({'params': p}, x), y), params,
                             key=jax.random.key(0))
    print(report.table()); assert report.passed(1e-5)

Each checked coordinate θ_i gets (C(θ + ε e_i) - C(θ - ε e_i)) / 2ε, whose error is O(ε²) from
truncation plus O(u / ε) from rounding (u the unit roundoff). In float32 (u ≈ 6e-8) the best ε
leaves about 1e-5 relative error, the very tolerance being checked, so the whole check runs in
float64 (u ≈ 1e-16; ε = 1e-6 leaves ~1e-10): parameters are cast to float64 under
`jax.enable_x64`, the loss and the analytic gradient are re-traced there, and float32 inputs the
loss closes over are promoted with them. Kinks (ReLU at 0, a max-pool tie) within ε of the point
break the check locally; at random points in float64 they are rare.

Large tensors are sampled: `coords_per_tensor` coordinates each, drawn without replacement from
`key`, so a report is reproducible from its key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree


@dataclasses.dataclass(frozen=True)
class TensorCheck:
    """The check of one parameter tensor, over the coordinates that were perturbed."""

    path: str
    shape: tuple[int, ...]
    checked: int  # coordinates perturbed (all of them when the tensor is small)
    max_abs_error: float  # max |numeric - analytic| over those coordinates
    rel_error: float  # ||numeric - analytic|| / max(||numeric||, ||analytic||); 0 when both are 0


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    tensors: tuple[TensorCheck, ...]
    eps: float

    @property
    def max_rel_error(self) -> float:
        return max((t.rel_error for t in self.tensors), default=0.0)

    def passed(self, tol: float = 1e-5) -> bool:
        """True when every tensor's relative error is at most `tol`."""
        return self.max_rel_error <= tol

    def failures(self, tol: float = 1e-5) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.rel_error <= tol]

    def table(self) -> str:
        """A fixed-width table, one row per tensor, for logs and reports."""
        rows = [(t.path, str(t.shape), str(t.checked), f"{t.max_abs_error:.2e}",
                 f"{t.rel_error:.2e}") for t in self.tensors]
        head = ("parameter", "shape", "checked", "max |num-ana|", "rel error")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows),
                          f"max relative error {self.max_rel_error:.2e} (central differences, "
                          f"eps {self.eps:g}, float64)"])

    def __str__(self) -> str:
        return self.table()


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_gradients(loss_fn: Callable[[Any], jax.Array], params: Any, *, key: jax.Array,
                    grad_fn: Callable[[Any], Any] | None = None, coords_per_tensor: int = 16,
                    eps: float = 1e-6) -> GradCheckReport:
    """Compares `grad_fn(params)` (default `jax.grad(loss_fn)`) with central differences of the loss.

    `loss_fn(params) -> scalar` closes over the data and the model; `grad_fn(params)` returns a
    tree shaped like `params` (a hand-written backward pass, say); both must be traceable by
    `jax.jit`, and both are evaluated at float64 copies of `params`. Returns one `TensorCheck` per
    leaf, in `jax.tree_util` order.
    """
    if coords_per_tensor <= 0:
        raise ValueError(f"coords_per_tensor must be positive, got {coords_per_tensor}.")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}; 1e-6 suits float64.")
    grad_fn = jax.grad(loss_fn) if grad_fn is None else grad_fn
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        theta, unravel = ravel_pytree(params64)
        analytic_tree = jax.jit(grad_fn)(params64)
        if jax.tree.structure(analytic_tree) != jax.tree.structure(params64):
            raise ValueError(f"grad_fn returned a tree shaped {jax.tree.structure(analytic_tree)}, "
                             f"but the parameters are shaped {jax.tree.structure(params64)}; "
                             f"return one gradient per parameter, in the same tree.")
        analytic = np.asarray(ravel_pytree(
            jax.tree.map(lambda g: jnp.asarray(g, jnp.float64), analytic_tree))[0])

        leaves = jax.tree_util.tree_leaves_with_path(params64)
        offsets = np.cumsum([0] + [leaf.size for _, leaf in leaves])
        # One uniform draw over all of θ; each tensor checks its coordinates with the smallest
        # draws: a uniform sample without replacement, one compile whatever the tensor sizes.
        draws = np.asarray(jax.random.uniform(key, (theta.size,)))
        chosen = [lo + np.sort(np.argsort(draws[lo:hi], kind="stable")[:coords_per_tensor])
                  for lo, hi in zip(offsets[:-1], offsets[1:])]

        flat_loss = lambda t: loss_fn(unravel(t))

        @jax.jit
        def central(indices):
            # lax.map runs the 2K evaluations one after another in a single compiled loop: one
            # compile, and memory for one perturbed copy of θ instead of 2K.
            def one(i):
                step = jnp.zeros_like(theta).at[i].set(eps)
                return (flat_loss(theta + step) - flat_loss(theta - step)) / (2 * eps)
            return lax.map(one, indices)

        numeric = np.asarray(central(jnp.asarray(np.concatenate(chosen))))

    checks, start = [], 0
    for (path, leaf), idx in zip(leaves, chosen):
        num, ana = numeric[start:start + len(idx)], analytic[idx]
        start += len(idx)
        scale = max(np.linalg.norm(num), np.linalg.norm(ana))
        err = np.linalg.norm(num - ana)
        checks.append(TensorCheck(
            path=_path_name(path), shape=tuple(leaf.shape), checked=len(idx),
            max_abs_error=float(np.max(np.abs(num - ana), initial=0.0)),
            rel_error=float(err / scale) if scale > 0 else 0.0))
    return GradCheckReport(tensors=tuple(checks), eps=eps)
