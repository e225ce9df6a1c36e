"""A run's data held in memory, and its batches: replayable shuffles, padded evaluation.

Images stay uint8 on the host (4x less to copy than float32) and are scaled and normalized inside
the compiled step by `pixels.normalize`; a dataset of float images (cnnjax/data/sources.py) is held
as float32 in the same 0..255 units, so one `normalize` serves both. Batch order is a function of
(seed, epoch) alone (cnnjax/data/order.py), so any epoch can be replayed without running the ones
before it. Training drops the last partial batch (a different one each epoch, since the order is
reshuffled); evaluation pads it and masks the padding, so every example is counted exactly once.
The streamed twin of `Data` (cnnjax/data/stream.py) gives the same batches through the same methods.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from cnnjax.data import datasets, stream
from cnnjax.data.order import (check_eval_batch_size, epoch_permutation, process_rows,
                               steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class Data:
    """The three splits of a run, in memory: (N, H, W, C) images, uint8 or float32 in 0..255
    units, and int32 labels; `skipped` names the image files left out as unreadable."""

    spec: datasets.DatasetSpec
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    skipped: tuple[str, ...] = ()

    def size(self, split: str) -> int:
        return len(getattr(self, split)[1])

    def images(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, split)

    def train_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0,
                      part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        return train_batches(*self.train, batch_size, seed, epoch, start, part)

    def eval_batches(self, split: str, batch_size: int, part: tuple[int, int] = (0, 1)
                     ) -> Iterator[dict[str, np.ndarray]]:
        return eval_batches(*getattr(self, split), batch_size, part)

    def position(self) -> None:
        """Nothing to save: in-memory batches start anywhere from (epoch, batch) alone."""
        return None

    def restore(self, saved) -> None:
        pass

    def report(self) -> dict:
        return {"streamed": False, **stream.skipped_report(self.skipped)}

    def close(self) -> None:
        pass


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                  epoch: int, start: int = 0, part: tuple[int, int] = (0, 1)
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled full batches of one epoch from batch `start` on; the last partial batch is dropped.

    'index' is each example's position in the training split: the per-example random draws
    (dropout, augmentation) are keyed by it. `start` resumes an epoch without re-reading the
    batches before it. With `part=(process, count)` only that process's rows of each global batch
    are read, every process agreeing on the global order.
    """
    n_steps = steps_per_epoch(len(labels), batch_size)
    order = epoch_permutation(len(labels), seed, epoch)[: n_steps * batch_size]
    rows = process_rows(batch_size, part)
    for idx in order.reshape(n_steps, batch_size)[start:, rows].astype(np.int32):
        yield {"image": images[idx], "label": labels[idx], "index": idx}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
    """Batches in order, all of the same shape (one compile); the last is zero-padded with mask 0,
    so every example counts exactly once. `part` as in `train_batches`."""
    check_eval_batch_size(batch_size)
    rows = process_rows(batch_size, part)
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(y)
        mask = np.ones(batch_size, np.float32)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            mask[batch_size - pad:] = 0.0
        yield {"image": x[rows], "label": y[rows], "mask": mask[rows]}
