"""Preemption: SIGTERM (a scheduler's notice) and Ctrl-C stop training cleanly.

`handling()` is a context manager that `train_and_evaluate` and `run_sweep` hold while they train
(in the main thread; elsewhere, and when already held, it does nothing). The first SIGTERM or
SIGINT only sets a flag and prints one line; the loop reads it (`requested`) after every step,
checkpoints there (the log window not yet written goes into the checkpoint too) and returns a
stopped result naming the signal, which `cnnjax train` and `cnnjax sweep` turn into exit status
128 + the signal's number (130 for SIGINT, 143 for SIGTERM) after a line saying how to resume. A
second signal aborts at once (KeyboardInterrupt, or SystemExit(143) for SIGTERM); the checkpoints
already written stay. The previous handlers come back when the context ends.

A caller that runs several trainings (a search worker) may hold `handling()` around all of them:
the flag then stays set across them, so it can stop starting new work. The processes of a
multi-process run agree on the step (`agreed`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[str] = []  # the signals' names since the outermost `handling()` began
_previous: dict[int, object] = {}  # the handlers `handling()` replaced, while it is held
_depth = 0


def requested() -> str | None:
    """The name of the first signal received ('SIGTERM', 'SIGINT'), or None."""
    return _received[0] if _received else None


def agreed() -> str | None:
    """`requested()` as every process of a multi-process run sees it: a signal any of them got
    (one small all-gather per call), so that they all checkpoint at the same step; a
    one-process run asks no one."""
    if jax.process_count() == 1:
        return requested()
    codes = multihost_utils.process_allgather(
        np.int32(signal.Signals[requested()].value if requested() else 0))
    code = int(np.max(codes))
    return signal.Signals(code).name if code else None


def exit_status(name: str) -> int:
    """The shell's status for a process ended by the signal: 128 + its number."""
    return 128 + int(signal.Signals[name])


def _restore() -> None:
    for signum, handler in _previous.items():  # None: a handler not set from Python
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    _previous.clear()


def _handle(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _received:  # the second: abort now
        _restore()
        print(f"cnnjax: {name} again: aborting; the last checkpoint stays.", file=sys.stderr,
              flush=True)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(exit_status(name))
    _received.append(name)
    print(f"cnnjax: {name} received: checkpointing at the next step boundary, then stopping "
          f"(send it again to abort at once).", file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Catches SIGTERM and SIGINT as preemption while held (see the module's docstring)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _depth == 0
    if outermost:
        _received.clear()
        for signum in SIGNALS:
            _previous[signum] = signal.signal(signum, _handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outermost:
            _restore()
