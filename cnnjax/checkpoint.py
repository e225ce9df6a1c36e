"""Saving and restoring model variables with orbax-checkpoint (no pickle on the load path).

Restores go into an abstract tree built with `jax.eval_shape`, so a checkpoint of another
architecture is refused with every mismatched parameter path named, before any data is touched.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_DIR = "model"  # the best parameters (and batch statistics) of a finished run


def save_variables(path: pathlib.Path, variables: dict[str, Any]) -> None:
    """Writes {'params': ..., 'batch_stats': ...} to `path` (a new directory), waiting for the write."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(pathlib.Path(path).absolute(), jax.device_get(variables))
        ckptr.wait_until_finished()


def _shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in flat}


def restore_variables(path: pathlib.Path, abstract: dict[str, Any]) -> dict[str, Any]:
    """Restores variables shaped like `abstract` (from `jax.eval_shape(model.init, ...)`).

    Raises ValueError listing each parameter path whose shape differs, is missing or is extra.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}; train a run first (cnnjax train).")
    with ocp.StandardCheckpointer() as ckptr:
        stored = _shapes(ckptr.metadata(path).item_metadata.tree)
        wanted = _shapes(abstract)
        problems = []
        for key in sorted(set(stored) | set(wanted)):
            if key not in stored:
                problems.append(f"  {key}: missing in checkpoint, model expects {wanted[key]}")
            elif key not in wanted:
                problems.append(f"  {key}: in checkpoint {stored[key]}, not in the model")
            elif stored[key] != wanted[key]:
                problems.append(f"  {key}: checkpoint {stored[key]} vs model {wanted[key]}")
        if problems:
            raise ValueError(f"checkpoint {path} does not fit the model:\n" + "\n".join(problems)
                             + "\nRestore it with the config it was trained with (its run's config.json).")
        return ckptr.restore(path, abstract)
