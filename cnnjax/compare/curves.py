"""Learning curves of many runs overlaid: validation loss and accuracy by epoch, train loss by
step. Each run is named in the legend by the settings in which the runs differ; the runs come
best first and are coloured from dark (best) to light along one colour map, the best drawn
thickest, so rank reads off the colour and the legend's order alike."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from matplotlib import colormaps

from cnnjax.report.plots import new_figure
from cnnjax.training.runset import RunRecord

NAMED = 10  # legend entries at most: the best runs; the others are drawn, in lighter colours
CURVES = (("epoch", "val_loss", "validation loss", True), ("epoch", "val_accuracy",
                                                          "validation accuracy", False),
          ("step", "loss", "train loss (window mean)", True))


def colours(n: int) -> list:
    """Best (first) darkest; the map's light end is cut off so every line stays visible."""
    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, n)] if n > 1 else [cmap(0.0)]


def _series(records: list[dict], kind: str, key: str) -> tuple[list, list]:
    rows = [r for r in records if r.get("kind") == kind and key in r]
    return [r["epoch" if kind == "epoch" else "step"] for r in rows], [r[key] for r in rows]


def curve_figures(out: pathlib.Path, runs: Sequence[RunRecord], labels: Sequence[str]
                  ) -> list[pathlib.Path]:
    """Writes curves_<metric>.png for each of CURVES; returns their paths."""
    metrics = [r.metrics() for r in runs]
    cs = colours(len(runs))
    small = len(runs) > 8
    written = []
    for kind, key, title, log in CURVES:
        fig, ax = new_figure(figsize=(8.5 if small else 7.5, 4.4))
        for i, (records, label) in enumerate(zip(metrics, labels)):
            xs, ys = _series(records, kind, key)
            if not xs:
                continue
            ax.plot(xs, ys, color=cs[i], lw=2.2 if i == 0 else 1.0,
                    label=label if i < NAMED else None,
                    marker="o" if kind == "epoch" and not small else None, ms=2.5,
                    zorder=len(runs) - i)
            if kind == "epoch" and (best := runs[i].summary.get("best_epoch")) in xs:
                ax.plot([best], [ys[xs.index(best)]], marker="*", ms=9, color=cs[i],
                        markeredgecolor="black", markeredgewidth=0.5, zorder=len(runs) + 1)
        ax.set(xlabel=kind, ylabel=title, title=f"{title} by {kind}")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if small else 7, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False, title=f"best {NAMED} of {len(runs)}" if len(runs) > NAMED
                  else None, title_fontsize=7)
        path = out / f"curves_{key}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend outside the axes kept whole
        written.append(path)
    return written
