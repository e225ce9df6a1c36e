"""The one rule for "is it time": logs, mid-epoch checkpoints and `Periodic` callbacks ask it."""

from __future__ import annotations

from typing import Iterable


def is_due(count: int, every: int | None = None, at: Iterable[int] = (),
           since: int | None = None) -> bool:
    """Whether a multiple of `every`, or a count in `at`, lies in (since, count]; `since`
    defaults to count - 1 (asked at every count). Asked only now and then (at log lines, say),
    it is due at the first asking at or after each multiple."""
    since = count - 1 if since is None else since
    if every and count // every > since // every:
        return True
    return any(since < a <= count for a in at)
