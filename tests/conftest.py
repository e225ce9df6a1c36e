"""Shared test setup: prepared datasets go to a temporary TFDS dir unless CNNJAX_DATA_DIR is set;
the tiny test models of `fixtures` are registered; compiled programs are shared through JAX's
persistent compilation cache.

The suite trains many small runs of the same few configs, each building its jitted functions
anew, so most of its time was XLA compiling the same programs again. A session-private cache
directory (set in the environment, so CLI subprocesses share it too) serves an identical program
from the first compile; executables are looked up by their HLO and compile options, so a hit runs
the very program a compile would have produced and every assertion holds as before.
"""

import os
import shutil
import sys
import tempfile

import pytest

_JAX_CACHE = {"jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}  # cache every program


def pytest_configure(config):
    os.environ.setdefault("CNNJAX_DATA_DIR", tempfile.mkdtemp(prefix="cnnjax-tfds-"))
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = tempfile.mkdtemp(prefix="cnnjax-jax-cache-")
        config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
        settings = {**_JAX_CACHE, "jax_compilation_cache_dir": cache}
        os.environ.update({name.upper(): str(value) for name, value in settings.items()})
        if "jax" in sys.modules:  # imported already (by a plugin): its config read the env then
            for name, value in settings.items():
                sys.modules["jax"].config.update(name, value)
    import fixtures  # tests/ is on sys.path (pytest's rootdir-relative imports)

    fixtures.register()


# The slowest files first (measured with --durations): pytest-xdist hands files out in collection
# order, so starting the long ones first lets the workers end together, not one finishing alone.
# A file that trains another file's config (preempt: stream's; disk: fault injection's;
# regularization: checkpoint's) comes well after it, so the compilation cache holds its programs.
SLOW_FIRST = ("test_search.py", "test_sweep.py", "test_fault_injection.py", "test_parallel.py",
              "test_stream.py", "test_steps.py", "test_visualize.py", "test_checkpoint.py",
              "test_open.py", "test_transfer.py", "test_faults.py", "test_reliability.py",
              "test_callbacks.py", "test_preempt.py", "test_disk.py", "test_regularization.py",
              "test_train.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


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
