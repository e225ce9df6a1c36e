"""Checkpoints of the whole training state with orbax-checkpoint, for exact resume.

A run directory's `ckpt/` holds one orbax step directory per save, each with two items: `state`
(the TrainState: params, batch statistics, optimizer and plateau state, step) and `loop` (JSON: epoch,
position in the epoch, early-stopping state, best step, how many log lines were written). Orbax
writes each step into a temporary directory and renames it when complete, so a crash mid-write
leaves the previous checkpoints intact. Kept: the last `keep` saves plus the best by validation
loss. Nothing on the load path unpickles.

Restores go into an abstract state from `jax.eval_shape`, after comparing every array's shape with
the checkpoint's metadata, so a checkpoint of another architecture is refused with each mismatched
path named before any data is read.
"""

from __future__ import annotations

import logging
import pathlib
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CKPT_DIR = "ckpt"
log = logging.getLogger(__name__)


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def shapes(tree) -> dict[str, tuple]:
    """{'params/conv1/kernel': (3, 3, 1, 32), ...} for every array leaf of a state or its metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_name(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def shape_mismatches(stored: dict[str, tuple], wanted: dict[str, tuple]) -> list[str]:
    problems = []
    for key in sorted(set(stored) | set(wanted)):
        if key not in stored:
            problems.append(f"  {key}: missing in checkpoint, model expects {wanted[key]}")
        elif key not in wanted:
            problems.append(f"  {key}: in checkpoint {stored[key]}, not in the model")
        elif stored[key] != wanted[key]:
            problems.append(f"  {key}: checkpoint {stored[key]} vs model {wanted[key]}")
    return problems


class Checkpointer:
    """The orbax CheckpointManager of one run directory."""

    def __init__(self, run_dir: pathlib.Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {keep}.")
        self.directory = (pathlib.Path(run_dir) / CKPT_DIR).absolute()
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            # Only epochs that improved the validation loss carry metrics, so the best of them is
            # the latest improvement, the same one early stopping picked.
            policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "loop": ocp.JsonCheckpointHandler()})
        self.seconds_blocked = 0.0  # time the training loop waited on saves

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, loop: dict[str, Any], val_loss: float | None = None) -> None:
        """Starts saving (asynchronously where enabled); `val_loss` marks a best-so-far candidate."""
        t0 = time.perf_counter()
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        loop=ocp.args.JsonSave(loop)),
                          metrics=None if val_loss is None else {"val_loss": float(val_loss)},
                          force=True)
        self.seconds_blocked += time.perf_counter() - t0

    def wait(self) -> None:
        t0 = time.perf_counter()
        self.manager.wait_until_finished()
        self.seconds_blocked += time.perf_counter() - t0

    def check_fits(self, step: int, abstract_state) -> None:
        """Raises ValueError naming every parameter path whose shape differs from the model's."""
        stored = shapes(self.manager.item_metadata(step)["state"])
        problems = shape_mismatches(stored, shapes(abstract_state))
        if problems:
            raise ValueError(f"checkpoint {self.directory / str(step)} does not fit the model:\n"
                             + "\n".join(problems) + "\nRestore it with the config it was trained "
                             "with (its run's config.json).")

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
        """(state, loop, step) of `step`, or of the newest readable checkpoint.

        Without `step`, a damaged checkpoint (unreadable metadata or array files) is skipped with a
        warning naming it and the next older one is tried.
        """
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train the run first "
                                    f"(cnnjax train).")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                        f"available steps: {steps}.")
            return self._restore(abstract_state, step) + (step,)
        for candidate in reversed(steps):
            try:
                return self._restore(abstract_state, candidate) + (candidate,)
            except ValueError as err:
                if "does not fit the model" in str(err):
                    raise
                self._skip(candidate, err)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                self._skip(candidate, err)
        raise FileNotFoundError(f"every checkpoint in {self.directory} ({steps}) is damaged; "
                                f"the run cannot be resumed.")

    def _skip(self, step: int, err: Exception) -> None:
        warnings.warn(f"checkpoint {self.directory / str(step)} is damaged or incomplete and was "
                      f"skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                      RuntimeWarning, stacklevel=3)

    def _restore(self, abstract_state, step: int) -> tuple[Any, dict[str, Any]]:
        self.check_fits(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
        return restored["state"], restored["loop"]

    def close(self) -> None:
        self.wait()
        self.manager.close()
