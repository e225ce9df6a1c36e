"""Names that reach user code: a registered name, or an import path `package.module:Name`.

Models, datasets, losses, optimizers, schedules and augmentations are looked up the same way,
built-ins included: each kind keeps a `Registry` and falls back to importing a path with a colon. A failed
import names the path, the module that failed and the fix; nothing is imported before it is asked
for, so a run's config.json, which records the path, reloads wherever the module is importable.
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any, Callable


def is_import_path(name: str) -> bool:
    return ":" in name


class UserCodeError(RuntimeError):
    """A user's code (a callback, say) raised while cnnjax ran it: named with its own error and
    line; the run it happened in stops, resumable from its last checkpoint."""


def load_object(path: str, what: str) -> Any:
    """The object `package.module:Name` (dots after the colon reach attributes) names. A module
    that is missing, does not parse, misses a dependency or raises while importing is named with
    the user's file and line, as one ValueError."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not an import path of the form package.module:Name.")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ValueError(f"{what} {path!r}: there is no module {err.name!r}; install it or put "
                             f"its directory on PYTHONPATH.") from None
        raise ValueError(f"{what} {path!r}: {where(err)}module {module_name!r} imports "
                         f"{err.name!r}, which is not installed; install it.") from None
    except SyntaxError as err:
        raise ValueError(f"{what} {path!r}: {err.filename}:{err.lineno}: SyntaxError: "
                         f"{err.msg}") from None
    except Exception as err:  # the user's module raised while importing
        raise ValueError(f"{what} {path!r}: importing {module_name!r} raised {where(err)}"
                         f"{type(err).__name__}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


class Registry:
    """The names of one kind of object (models, datasets, losses, optimizers, schedules,
    augmentations): `register(name, obj)` (or `@register(name)`) puts one in, `lookup(name)` finds a
    registered name or imports a `package.module:Name` path; cnnjax's built-ins are registered
    through the same call as a user's."""

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key  # 'model', and the config key that names one: 'model.name'
        self._objects: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None):
        if is_import_path(name) or not name:
            raise ValueError(f"a registered {self.what} name may not be empty or hold ':', got "
                             f"{name!r}.")

        def put(o):
            self._objects[name] = o
            return o

        return put if obj is None else put(obj)

    def __contains__(self, name: str) -> bool:
        return name in self._objects

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._objects))

    def lookup(self, name: str, also_known: tuple[str, ...] = ()) -> Any:
        """The object `name` names; an unknown name lists the known ones (and `also_known`)."""
        if is_import_path(name):
            return load_object(name, self.key)
        if name not in self._objects:
            known = sorted({*self._objects, *also_known})
            raise ValueError(f"unknown {self.key} {name!r}; known: {', '.join(known)}, or an "
                             f"import path package.module:Name.")
        return self._objects[name]


def call(fn: Callable, what: str, *args, expected: str = "a function", **kwargs) -> Any:
    """`fn(*args, **kwargs)` where `fn` is a user's (or a built-in's) factory: a ValueError it
    raises passes as it is (it names the setting); any other error becomes one ValueError naming
    `what`, the error and the line of the factory's own code that raised it. An `fn` that is not
    callable (a number, a string at the import path) is named as such, with what was `expected`."""
    if not callable(fn):
        raise ValueError(f"{what} names {kind(fn)}, not {expected}.")
    try:
        return fn(*args, **kwargs)
    except ValueError:
        raise
    except Exception as err:  # the user's code: any failure is reported as theirs
        raise ValueError(f"{what}: {where(err)}{type(err).__name__}: {err}") from None


def kind(obj: Any) -> str:
    """'an int (42)', 'a module': what a user put where cnnjax wanted something else."""
    name, shown = type(obj).__name__, repr(obj)
    if hasattr(obj, "__qualname__"):  # a function or class: its name, not its address
        shown = f"{getattr(obj, '__module__', None) or '?'}.{obj.__qualname__}"
    article = "an" if name[0].lower() in "aeiou" else "a"
    return f"{article} {name}" + (f" ({shown})" if len(shown) <= 40 else "")


def first_line(err: BaseException) -> str:
    """'TypeError: the first line of its message' (JAX's errors run to a page)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def where(err: BaseException) -> str:
    """'file.py:12: ' of the innermost frame outside cnnjax, the libraries and Python's own
    modules, or ''."""
    import sysconfig
    import traceback

    ours = (str(pathlib.Path(__file__).parent) + "/", sysconfig.get_paths()["stdlib"], "<")
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "site-packages" not in f.filename and not f.filename.startswith(ours)]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""
