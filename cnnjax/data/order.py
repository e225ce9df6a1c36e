"""Which examples a step reads: the seeded validation carve-out, each epoch's order, the steps of
an epoch and a process's rows of a global batch. Pure functions of the seed and the counts, shared
by the in-memory batches and the streamed ones (cnnjax/data/memory.py, stream.py), so both
read the same examples at every step.
"""

from __future__ import annotations

import numpy as np

_SPLIT_STREAM = 0x5EED  # keeps the validation split's draw apart from the epoch shuffles


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (1 - f, f) partition of range(n); each part sorted, so it reads in file order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    n_val = int(round(n * val_fraction))
    if n_val == 0 or n_val == n:
        raise ValueError(f"data.val_fraction={val_fraction} of {n} examples leaves an empty split.")
    perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps in one epoch: full batches only, the remainder is dropped."""
    if batch_size <= 0:
        raise ValueError(f"train.batch_size must be positive, got {batch_size}.")
    if batch_size > num_examples:
        raise ValueError(f"train.batch_size={batch_size} is larger than the {num_examples} training "
                         f"examples; choose at most {num_examples}.")
    return num_examples // batch_size


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def process_rows(n: int, part: tuple[int, int]) -> slice:
    """The rows of an n-row global batch that process `part[0]` of `part[1]` loads."""
    index, count = part
    if n % count:
        raise ValueError(f"a batch of {n} does not split across {count} processes; choose a "
                         f"multiple of {count}.")
    return slice(index * n // count, (index + 1) * n // count)


def check_eval_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"train.eval_batch_size must be positive, got {batch_size}.")
