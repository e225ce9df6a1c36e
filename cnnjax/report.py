"""What a run leaves behind for people: the JSON-lines metrics log and PNG plots made from it.

`metrics.jsonl` holds only deterministic figures (a rerun with the same seed writes the same bytes);
wall-clock figures go to `timing.jsonl` beside it.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterable

import numpy as np


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


class JsonlWriter:
    """Appends one JSON object per line, flushed at once so a crash loses nothing written."""

    def __init__(self, path: pathlib.Path, keep_lines: int = 0, enabled: bool = True):
        """Opens `path` keeping its first `keep_lines` lines: a resumed run drops whatever was
        logged after the checkpoint it resumes from, so the log replays exactly. A disabled writer
        (processes other than the first) only counts lines."""
        self.path, self.lines, self._file = path, keep_lines, None
        if not enabled:
            return
        kept = path.read_text(encoding="utf-8").splitlines(True)[:keep_lines] if path.exists() else []
        if len(kept) < keep_lines:
            raise ValueError(f"{path} has {len(kept)} lines, the checkpoint expects {keep_lines}; "
                             f"the log was altered after the checkpoint was written.")
        self._file = open(path, "w", encoding="utf-8")
        self._file.writelines(kept)
        self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records: Iterable[dict], kind: str, key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and key in r:
            xs.append(r["epoch"] if kind == "epoch" else r["step"])
            ys.append(r[key])
    return xs, ys


def plot_run(run_dir: pathlib.Path, class_names: list[str] | None = None) -> list[pathlib.Path]:
    """Writes loss, accuracy, learning-rate, gradient-norm and confusion-matrix PNGs of a run."""
    plt = _pyplot()
    records = read_jsonl(run_dir / "metrics.jsonl")
    written = []

    def save(fig, name):
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for metric, title in (("loss", "Loss"), ("accuracy", "Accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "val"):
            ax.plot(*_series(records, "epoch", f"{split}_{metric}"), marker="o", ms=3, label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title} per epoch")
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, f"{metric}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(*_series(records, "epoch", "learning_rate"), where="post")
    ax.set(xlabel="epoch", ylabel="learning rate", yscale="log", title="Learning rate (plateau rule)")
    ax.grid(alpha=0.3)
    save(fig, "learning_rate.png")

    fig, ax = plt.subplots(figsize=(7, 4))
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
    if summary_path.exists():
        confusion = json.loads(summary_path.read_text()).get("test", {}).get("confusion")
        if confusion:
            save(confusion_figure(plt, np.asarray(confusion), class_names), "confusion_matrix.png")
    return written


def confusion_figure(plt, confusion: np.ndarray, class_names: list[str] | None):
    n = confusion.shape[0]
    names = class_names or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(6, 5.5))
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
    plt = _pyplot()
    n, draws = len(images), 4
    pixels = np.asarray(images, np.float32)
    rows = [pixels] + [np.asarray(augmenter(pixels, jax.random.fold_in(key, d), example_ids))
                       for d in range(draws)]
    fig, axes = plt.subplots(draws + 1, n, figsize=(n * 0.8, (draws + 1) * 0.85))
    for r, row in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(row[c, ..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel("original" if r == 0 else f"draw {r}", fontsize=7)
    fig.suptitle("Training augmentation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
