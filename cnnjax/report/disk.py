"""Writes the disk refuses, said in one line, and files that are never left half written.

A full disk, an exceeded quota or a read-only (or not writable) directory surfaces deep in a
library as an OSError or as a library's own error whose text holds the system's message (orbax
reports a failed write as tensorstore's ValueError). `disk_error` turns either into one
`DiskError` naming the directory, the reason, what is safe and what to do; anything else is not
about the disk and is left alone. `write_atomic` writes a file beside its final name and renames
it into place, so a crash or a full disk leaves the old file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
from typing import Iterator

_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "it is not writable",
            errno.EPERM: "it is not writable"}
_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
          "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}


class DiskError(OSError):
    """A write the disk refused, as one line (no '[Errno N]' prefix)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def disk_error(err: BaseException, directory: pathlib.Path | str, fix: str, kept: str = ""
               ) -> DiskError | None:
    """One DiskError: 'cannot write to DIR: the disk is full; KEPT. FIX', or None when `err` is
    not about the disk."""
    code = getattr(err, "errno", None)
    if code not in _REASONS:
        code = next((c for text, c in _TEXTS.items() if text in str(err)), None)
    if code is None:
        return None
    kept = f"; {kept}" if kept else ""
    return DiskError(code, f"cannot write to {directory}: {_REASONS[code]}{kept}. {fix}")


@contextlib.contextmanager
def writing(directory: pathlib.Path | str, fix: str, kept: str = "") -> Iterator[None]:
    """Re-raises a refused write inside the block as `disk_error`'s one line."""
    try:
        yield
    except DiskError:
        raise
    except Exception as err:
        raise disk_error(err, directory, fix, kept) or err


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place: a crash or a refused
    write leaves the previous file (or none), and no temporary file behind on a refusal."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
