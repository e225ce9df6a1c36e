"""The run's logs: JSON lines for metrics and timing, JSON for the config and summary.

`metrics.jsonl` holds only deterministic figures (a rerun with the same seed writes the same bytes);
wall-clock figures go to `timing.jsonl` beside it.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
from typing import Any

import numpy as np

from cnnjax.report import disk


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
        logged after the checkpoint it resumes from, so the log replays exactly. The file is cut
        in place, never rewritten, so a full disk cannot lose the lines kept. A disabled writer
        (processes other than the first) only counts lines."""
        self.path, self.lines, self._file = path, keep_lines, None
        if not enabled:
            return
        kept = io.BytesIO(path.read_bytes()).readlines()[:keep_lines] if path.exists() else []
        if len(kept) < keep_lines:
            raise ValueError(f"{path} has {len(kept)} lines, the checkpoint expects {keep_lines}; "
                             f"the log was altered after the checkpoint was written.")
        for number, line in enumerate(kept, start=1):
            _parse_line(path, number, line.decode("utf-8", errors="replace"))
        if path.exists():
            with open(path, "r+b") as f:
                f.truncate(sum(map(len, kept)))
        self._file = open(path, "a", encoding="utf-8")
        if kept and not kept[-1].endswith(b"\n"):  # the last kept line lost only its end
            self._file.write("\n")
            self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _parse_line(path: pathlib.Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        record = err
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {number}, is not a JSON object ({line.strip()[:60]!r}); the "
                         f"log was edited or damaged: restore it from a copy, or train again into "
                         f"a new --run-dir.")
    return record


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a line that does not parse is named by its number."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [_parse_line(path, n, line) for n, line in enumerate(f, start=1) if line.strip()]


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Writes `obj` as JSON, whole or not at all (`disk.write_atomic`): a summary.json is
    complete wherever it exists."""
    disk.write_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n")
