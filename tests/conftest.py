"""Shared test setup: prepared datasets go to a temporary TFDS dir unless CNNJAX_DATA_DIR is set;
the tiny test models of `fixtures` are registered."""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("CNNJAX_DATA_DIR", tempfile.mkdtemp(prefix="cnnjax-tfds-"))
    import fixtures  # tests/ is on sys.path (pytest's rootdir-relative imports)

    fixtures.register()
