"""Calibration: does a model's confidence match how often it is right?

Expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural Networks"): the
predictions are put into equal-width bins by their confidence (the top class's probability); ECE
is the count-weighted mean over bins of |accuracy - mean confidence|. The reliability diagram
plots each bin's accuracy against its confidence (cnnjax.visualize.calibration draws it).
Pure NumPy, no model: the inputs are probabilities and labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BINS = 15  # Guo et al.'s choice


@dataclasses.dataclass(frozen=True)
class Reliability:
    """Per confidence bin [edges[i], edges[i+1]) (the last bin closed): how many predictions,
    their mean confidence and their accuracy (NaN for an empty bin)."""

    edges: np.ndarray  # (bins + 1,)
    count: np.ndarray  # (bins,) int
    confidence: np.ndarray  # (bins,)
    accuracy: np.ndarray  # (bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of count/N * |accuracy - confidence|."""
        full = self.count > 0
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float(np.sum(self.count[full] * gaps) / np.sum(self.count))

    def to_json(self) -> dict:
        def clean(a):
            return [None if np.isnan(v) else float(v) for v in a]

        return {"bins": len(self.count), "ece": self.ece, "edges": self.edges.tolist(),
                "count": self.count.tolist(), "confidence": clean(self.confidence),
                "accuracy": clean(self.accuracy)}


def reliability(probabilities, labels, bins: int = BINS) -> Reliability:
    """The reliability table of (N, C) class probabilities against (N,) integer labels."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or not len(labels):
        raise ValueError(f"calibration needs (N, C) probabilities and N labels, N > 0; got "
                         f"{probabilities.shape} and {labels.shape}.")
    if bins <= 0:
        raise ValueError(f"bins must be positive, got {bins}.")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds edges[i] <= confidence < edges[i + 1]; a confidence of exactly 1 the last
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / count
        accuracy = np.bincount(which, correct.astype(np.float64), bins) / count
    return Reliability(edges=edges, count=count, confidence=mean_conf, accuracy=accuracy)


def expected_calibration_error(probabilities, labels, bins: int = BINS) -> float:
    return reliability(probabilities, labels, bins).ece
