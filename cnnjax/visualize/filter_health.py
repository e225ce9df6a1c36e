"""The filter-health figure; the statistics are `cnnjax.nn.health`'s."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cnnjax.nn.health import FilterHealth
from cnnjax.report.plots import new_figure


def health_figure(health: Mapping[str, FilterHealth]):
    """Per layer: mean rectified activation per filter (dead ones red) and the dead-output fraction."""
    fig, axes = new_figure(len(health), 2, figsize=(12, 2.6 * len(health)), squeeze=False)
    for row, h in zip(axes, health.values()):
        idx = np.arange(len(h.mean_activation))
        colors = np.where(h.max_preactivation <= 0.0, "tab:red", "tab:blue")
        row[0].bar(idx, h.mean_activation, color=colors, width=0.8)
        row[0].set(title=f"{h.layer}: mean ReLU output per filter ({len(h.dead)} dead, red)",
                   xlabel="filter", ylabel="mean activation")
        row[1].bar(idx, h.dead_fraction, color=colors, width=0.8)
        row[1].set(title=f"{h.layer}: fraction of outputs the ReLU zeroes", xlabel="filter",
                   ylabel="fraction", ylim=(0, 1.02))
        for ax in row:
            ax.grid(alpha=0.3, axis="y")
            ax.set_xlim(-1, len(idx))
    fig.tight_layout()
    return fig
