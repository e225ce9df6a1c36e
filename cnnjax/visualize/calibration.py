"""The reliability diagram (cnnjax.training.calibration computes the numbers): each confidence
bin's accuracy against its mean confidence, the diagonal being perfect calibration, with the
share of predictions per bin beneath. Several models (runs, an ensemble) share one diagram."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cnnjax.report.plots import new_figure
from cnnjax.training.calibration import Reliability


def reliability_figure(tables: Mapping[str, Reliability], title: str = "Reliability (test)"):
    """One line per model, named with its ECE in the legend; a point's area grows with its bin's
    count (a bin of a few predictions swings far from the diagonal by chance); empty bins are
    left out."""
    fig, (ax, hist) = new_figure(2, 1, figsize=(5.2, 5.6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for i, (name, table) in enumerate(tables.items()):
        full = table.count > 0
        ax.plot(table.confidence[full], table.accuracy[full], lw=1.0, alpha=0.7,
                label=f"{name} (ECE {table.ece:.4f})", color=f"C{i}")
        share = table.count[full] / table.count.sum()
        ax.scatter(table.confidence[full], table.accuracy[full], s=8 + 160 * np.sqrt(share),
                   color=f"C{i}", edgecolors="black", linewidths=0.4, zorder=3)
        width = np.diff(table.edges)[0] / max(1, len(tables))
        hist.bar(table.edges[:-1] + width * (i + 0.5), table.count / table.count.sum(),
                 width=width, color=f"C{i}", alpha=0.8)
    ax.set(ylabel="accuracy", xlim=(0, 1.03), ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    hist.set(xlabel="confidence (top class probability)", ylabel="share", yscale="log")
    hist.grid(alpha=0.3)
    return fig
