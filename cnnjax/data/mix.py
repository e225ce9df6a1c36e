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
    mixup: float = 0.0  # Beta alpha; 0: off
    cutmix: float = 0.0

    @property
    def on(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, images: jax.Array, partners: jax.Array, example_ids: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(N, H, W, C) images and their partners -> (mixed images, lambda per example)."""
        return jax.vmap(lambda x, p, i: self._one(x, p, jax.random.fold_in(key, i)))(
            images, partners, example_ids)

    def _one(self, x: jax.Array, partner: jax.Array, key: jax.Array):
        k_choice, k_mixup, k_cutmix, k_box = jax.random.split(key, 4)
        mixed, lam = x, jnp.float32(1.0)
        if self.mixup > 0:
            lam_m = jax.random.beta(k_mixup, self.mixup, self.mixup)
            mixed_m = lam_m * x + (1.0 - lam_m) * partner
        if self.cutmix > 0:
            mixed_c, lam_c = cutmix_one(x, partner, jax.random.beta(k_cutmix, self.cutmix, self.cutmix),
                                        k_box)
        if self.mixup > 0 and self.cutmix > 0:
            use_mixup = jax.random.bernoulli(k_choice)
            return (jnp.where(use_mixup, mixed_m, mixed_c), jnp.where(use_mixup, lam_m, lam_c))
        if self.mixup > 0:
            return mixed_m, lam_m
        if self.cutmix > 0:
            return mixed_c, lam_c
        return mixed, lam


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
    return Mixing(float(cfg.mixup), float(cfg.cutmix))
