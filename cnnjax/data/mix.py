"""Mixup and CutMix on explicit per-example keys.

Each example is mixed with its partner, the batch's previous row (the first with the last), so
partners follow from the batch order alone, a function of (seed, epoch); its mixing weight
lambda ~ Beta(alpha, alpha), and CutMix's box, come from `fold_in(key, example index)`. An
example's draw therefore does not depend on the pass, device or batch position it lands on. The
loss is then lambda * L(label) + (1 - lambda) * L(partner's label) (Zhang et al. 2018, Yun et al.
2019); with both on, each example takes one of the two with probability 1/2, also keyed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cnnjax.config import AugmentConfig


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup and CutMix by their Beta alphas (0: off). An alpha may be an array inside a compiled
    program shared by several configs (a `cnnjax sweep` grid): the program then holds that
    mixing, and each config takes what its own `Mixing` of numbers would, the others' choices
    masked out exactly."""

    mixup: float | jax.Array = 0.0  # Beta alpha; 0: off
    cutmix: float | jax.Array = 0.0

    @property
    def on(self) -> bool:
        """Whether the program mixes at all (statically: a traced alpha counts as on)."""
        return _present(self.mixup) or _present(self.cutmix)

    def __call__(self, images: jax.Array, partners: jax.Array, example_ids: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(N, H, W, C) images and their partners -> (mixed images, lambda per example)."""
        return jax.vmap(lambda x, p, i: self._one(x, p, jax.random.fold_in(key, i)))(
            images, partners, example_ids)

    def _one(self, x: jax.Array, partner: jax.Array, key: jax.Array):
        k_choice, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
        mixed, lam = x, jnp.float32(1.0)
        with_mixup, with_cutmix = _present(self.mixup), _present(self.cutmix)
        if with_mixup:
            alpha = _drawable(self.mixup)
            lam_m = jax.random.beta(k_mixup, alpha, alpha)
            mixed_m = lam_m * x + (1.0 - lam_m) * partner
        if with_cutmix:
            alpha = _drawable(self.cutmix)
            mixed_c, lam_c = cutmix_one(x, partner, jax.random.beta(k_cutmix, alpha, alpha), k_box)
        if _traced(self.mixup) or _traced(self.cutmix):
            return self._select(x, k_choice, mixed_m if with_mixup else None,
                                lam_m if with_mixup else None, mixed_c if with_cutmix else None,
                                lam_c if with_cutmix else None)
        if with_mixup and with_cutmix:
            use_mixup = jax.random.bernoulli(k_choice)
            return (jnp.where(use_mixup, mixed_m, mixed_c), jnp.where(use_mixup, lam_m, lam_c))
        if with_mixup:
            return mixed_m, lam_m
        if with_cutmix:
            return mixed_c, lam_c
        return mixed, lam

    def _select(self, x, k_choice, mixed_m, lam_m, mixed_c, lam_c):
        """With a traced alpha: what this config's own mixing would give, by masks (mixup, or
        CutMix, each when on; with both on, the keyed choice)."""
        mixup_on = self.mixup > 0 if mixed_m is not None else False
        cutmix_on = self.cutmix > 0 if mixed_c is not None else False
        use_mixup = mixup_on
        if mixed_m is not None and mixed_c is not None:
            use_mixup = mixup_on & (~jnp.asarray(cutmix_on) | jax.random.bernoulli(k_choice))
        mixed, lam = x, jnp.float32(1.0)
        if mixed_c is not None:
            use_cutmix = cutmix_on & ~jnp.asarray(use_mixup)
            mixed, lam = jnp.where(use_cutmix, mixed_c, mixed), jnp.where(use_cutmix, lam_c, lam)
        if mixed_m is not None:
            mixed, lam = jnp.where(use_mixup, mixed_m, mixed), jnp.where(use_mixup, lam_m, lam)
        return mixed, lam


def _traced(alpha) -> bool:
    return not isinstance(alpha, (int, float))


def _present(alpha) -> bool:
    """Whether a program holds this mixing: a traced alpha, or a number above 0."""
    return _traced(alpha) or alpha > 0


def _drawable(alpha):
    """A Beta parameter to draw with: a traced alpha of 0 (off for that config, its draw
    discarded) draws with 1 instead."""
    return jnp.where(alpha > 0, alpha, 1.0) if _traced(alpha) else alpha


def cutmix_one(x: jax.Array, partner: jax.Array, lam: jax.Array, key: jax.Array):
    """Pastes the partner's box of area about (1 - lam) * H * W, centred uniformly and clipped to
    the image, into `x`; returns the image and lambda corrected to the area actually kept."""
    h, w = x.shape[:2]
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = jnp.round(h * cut), jnp.round(w * cut)
    cy = jax.random.uniform(key, (), minval=0, maxval=h)
    cx = jax.random.uniform(jax.random.fold_in(key, 1), (), minval=0, maxval=w)
    y0, y1 = jnp.clip(jnp.floor(cy - ch / 2), 0, h), jnp.clip(jnp.floor(cy + ch / 2), 0, h)
    x0, x1 = jnp.clip(jnp.floor(cx - cw / 2), 0, w), jnp.clip(jnp.floor(cx + cw / 2), 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    mixed = jnp.where(box[..., None], partner, x)
    return mixed, 1.0 - jnp.sum(box) / (h * w)


def from_config(cfg: AugmentConfig) -> Mixing:
    """The config's mixing; an alpha that is an array (a traced config) stays one."""
    return Mixing(*(a if _traced(a) else float(a) for a in (cfg.mixup, cfg.cutmix)))
