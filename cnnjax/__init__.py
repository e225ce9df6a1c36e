"""cnnjax: a JAX functional research framework for convolutional neural networks.

Names are imported lazily so that `cnnjax --help` and config handling do not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "Config": "cnnjax.config", "DataConfig": "cnnjax.config", "ModelConfig": "cnnjax.config",
    "OptimConfig": "cnnjax.config", "TrainConfig": "cnnjax.config",
    "Run": "cnnjax.training.runs", "load_run": "cnnjax.training.runs",
    "train_and_evaluate": "cnnjax.training.loop",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cnnjax' has no attribute {name!r}")
