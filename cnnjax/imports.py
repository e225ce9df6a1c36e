"""Names that reach user code: a registered name, or an import path `package.module:Name`.

Models, datasets and losses are looked up the same way, built-ins included: each kind keeps a
registry (a dict filled by a decorator) and falls back to importing a path with a colon. A failed
import names the path, the module that failed and the fix; nothing is imported before it is asked
for, so a run's config.json, which records the path, reloads wherever the module is importable.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def is_import_path(name: str) -> bool:
    return ":" in name


def load_object(path: str, what: str) -> Any:
    """The object `package.module:Name` (dots after the colon reach attributes) names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not an import path of the form package.module:Name.")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {path!r}: cannot import {module_name!r} ({err}); install it or "
                         f"put its directory on PYTHONPATH.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


def lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    """`registry[name]`, or the object an import path names; unknown names list the known ones."""
    if is_import_path(name):
        return load_object(name, what)
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}, or an "
                         f"import path package.module:Name.")
    return registry[name]


def call(fn: Callable, what: str, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)` where `fn` is a user's (or a built-in's) factory: a ValueError it
    raises passes as it is (it names the setting); any other error becomes one ValueError naming
    `what`, the error and the line of the factory's own code that raised it."""
    try:
        return fn(*args, **kwargs)
    except ValueError:
        raise
    except Exception as err:  # the user's code: any failure is reported as theirs
        raise ValueError(f"{what}: {where(err)}{type(err).__name__}: {err}") from None


def where(err: BaseException) -> str:
    """'file.py:12: ' of the innermost frame outside cnnjax and the libraries, or ''."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "site-packages" not in f.filename and "/cnnjax/" not in f.filename
              and not f.filename.startswith("<")]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""


def registrar(registry: dict[str, Any], what: str) -> Callable:
    """A decorator factory: `@register(name)` puts the decorated object in `registry`."""

    def register(name: str, obj: Any = None):
        if is_import_path(name) or not name:
            raise ValueError(f"a registered {what} name may not be empty or hold ':', got {name!r}.")

        def put(o):
            registry[name] = o
            return o

        return put if obj is None else put(obj)

    return register
