"""PNG plots of a run, drawn with matplotlib's object API: `new_figure` makes a figure that no
pyplot state knows about, so cnnjax never switches the process's backend (a notebook that called
cnnjax keeps its inline plots) and never leaks figures. matplotlib is imported at the first figure:
a process that never draws (a killed run, `cnnjax eval`) does not pay for it."""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Iterable

import numpy as np

from cnnjax.report.logs import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(rows: int = 1, cols: int = 1, **kwargs):
    """`(figure, axes)` as `pyplot.subplots(rows, cols, **kwargs)` returns them, without pyplot;
    `figsize` and `dpi` go to the figure, the rest to `Figure.subplots`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), dpi=kwargs.pop("dpi", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def save_figure(fig: Figure, path: pathlib.Path, dpi: int = 110) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _series(records: Iterable[dict], kind: str, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and key in r:
            xs.append(r["epoch"] if kind == "epoch" else r["step"])
            ys.append(r[key])
    return xs, ys


def plot_run(run_dir: pathlib.Path, class_names: list[str] | None = None,
             confusion: list | None = None) -> list[pathlib.Path]:
    """Writes loss, accuracy, learning-rate, gradient-norm and confusion-matrix PNGs of a run;
    the test confusion matrix is `confusion`, or summary.json's when not given."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    written = []

    def save(fig, name):
        written.append(save_figure(fig, run_dir / name))

    for metric, title in (("loss", "Loss"), ("accuracy", "Accuracy")):
        fig, ax = new_figure(figsize=(6, 4))
        for split in ("train", "val"):
            ax.plot(*_series(records, "epoch", f"{split}_{metric}"), marker="o", ms=3, label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title} per epoch")
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, f"{metric}.png")

    fig, ax = new_figure(figsize=(6, 4))
    ax.step(*_series(records, "epoch", "learning_rate"), where="post")
    ax.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="Learning rate (plateau rule)")
    ax.grid(alpha=0.3)
    save(fig, "learning_rate.png")

    fig, ax = new_figure(figsize=(7, 4))
    steps = [r for r in records if r.get("kind") == "step"]
    layer_keys = sorted({k for r in steps for k in r if k.startswith("grad_norm/")})
    ax.plot(*_series(records, "step", "grad_norm"), lw=1.5, color="black", label="global")
    for key in layer_keys:
        ax.plot(*_series(records, "step", key), lw=0.8, label=key.split("/", 1)[1])
    ax.set(xlabel="step", ylabel="gradient norm", yscale="log", title="Gradient norms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "grad_norm.png")

    summary_path = run_dir / "summary.json"
    if confusion is None and summary_path.exists():
        confusion = json.loads(summary_path.read_text()).get("test", {}).get("confusion")
    if confusion:
        save(confusion_figure(np.asarray(confusion), class_names), "confusion_matrix.png")
    return written


def confusion_figure(confusion: np.ndarray, class_names: list[str] | None):
    n = confusion.shape[0]
    names = class_names or [str(i) for i in range(n)]
    fig, ax = new_figure(figsize=(6, 5.5))
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    threshold = confusion.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > threshold else "black")
    return fig


def augmentation_grid(path: pathlib.Path, augmenter, images: np.ndarray, key, example_ids) -> None:
    """Originals (top row) over four augmented draws each: what the model sees in training."""
    import jax
    n, draws = len(images), 4
    pixels = np.asarray(images, np.float32)
    rows = [pixels] + [np.asarray(augmenter(pixels, jax.random.fold_in(key, d), example_ids))
                       for d in range(draws)]
    fig, axes = new_figure(draws + 1, n, figsize=(n * 0.8, (draws + 1) * 0.85))
    for r, row in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(row[c, ..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel("original" if r == 0 else f"draw {r}", fontsize=7)
    fig.suptitle("Training augmentation", fontsize=9)
    save_figure(fig, path)
