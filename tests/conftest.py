"""Shared test setup: prepared datasets go to a temporary TFDS dir unless CNNJAX_DATA_DIR is set;
the tiny test models of `fixtures` are registered."""

import os
import tempfile

import pytest


def pytest_configure(config):
    os.environ.setdefault("CNNJAX_DATA_DIR", tempfile.mkdtemp(prefix="cnnjax-tfds-"))
    import fixtures  # tests/ is on sys.path (pytest's rootdir-relative imports)

    fixtures.register()


@pytest.fixture
def torch_one_thread():
    """One torch thread and a fixed seed: reproducible reductions, and no fight with XLA's thread
    pool in this process (the torch parity tests use it; torch is imported only there)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
