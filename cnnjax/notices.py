"""One-line warnings: what cnnjax tells a user without stopping the run.

Python's warnings print the source line of the frame they are attributed to; a warning raised
from inside TFDS's preparation or orbax's restore would show a line of that library after the
message. Every cnnjax warning goes through `warn`, attributed to 'cnnjax' itself, so it prints
as one line (`cnnjax:0: RuntimeWarning: ...`) while filters, `pytest.warns` and logging capture
still see it.
"""

from __future__ import annotations

import warnings


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Emits `message` (one line naming the thing and what to do) as a warning of `category`."""
    warnings.warn_explicit(" ".join(message.split("\n")), category, filename="cnnjax", lineno=0,
                           module="cnnjax")
