"""Where a study lives: an embedded journal file in the study directory, or a database.

With no `--storage` the study is Optuna's `JournalStorage` over a `JournalFileBackend` in
`<study>/study.journal`: no server, and several worker processes on one machine append to it under
the backend's file lock (SQLite, Optuna's other serverless store, reports "database is locked"
under concurrent writers). `--storage postgresql://user@host/db` (or any SQLAlchemy URL) is
Optuna's `RDBStorage`, which workers on many machines share; there each running trial records a
heartbeat, and the trial of a worker whose heartbeat goes stale is failed and queued again with its
parameters by Optuna's `RetryHeartbeatStaleTrialCallback`.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

JOURNAL = "study.journal"


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show it as given, minus anything after a ':' before '@'
        head, at, tail = url.rpartition("@")
        if not at:
            return url
        scheme, _, user = head.partition("://")
        return f"{scheme}://{user.split(':')[0]}:***@{tail}"


def database_url(url: str) -> str:
    """A PostgreSQL URL without a driver gets psycopg 3's (the driver cnnjax installs)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def open_storage(study_dir: pathlib.Path, url: str | None, heartbeat: int
                 ) -> optuna.storages.BaseStorage:
    """The study's storage: the journal file in `study_dir`, or the database at `url` (refused
    in one line, without its password, when it cannot be reached)."""
    if url is None:
        study_dir.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(study_dir / JOURNAL))
        return optuna.storages.JournalStorage(backend)
    if heartbeat <= 0:
        raise ValueError(f"--heartbeat must be a positive number of seconds, got {heartbeat}.")
    try:
        with optuna_quiet():
            return optuna.storages.RDBStorage(
                database_url(url), heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                engine_kwargs={"pool_pre_ping": True})
    except ImportError as err:
        raise ImportError(f"--storage {redacted(url)}: the database driver is missing ({err}); "
                          f"install it (PostgreSQL: pip install 'psycopg[binary]').") from None
    except Exception as err:  # SQLAlchemy's errors carry the URL and a page of context
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise ValueError(f"--storage {redacted(url)}: cannot open the database ({reason}); check "
                         f"the address, the user and that the server is running.") from None


@contextlib.contextmanager
def optuna_quiet():
    """Optuna's per-trial log lines and experimental-feature warnings: the worker prints its own."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(before)
