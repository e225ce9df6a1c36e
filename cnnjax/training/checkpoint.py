"""Checkpoints of the whole training state with orbax-checkpoint, for exact resume.

A run directory's `ckpt/` holds one orbax step directory per save, each with two items: `state`
(the TrainState: params, batch statistics, optimizer and plateau state, step) and `loop` (JSON: epoch,
position in the epoch, early-stopping state, best step, how many log lines were written). Orbax
writes each step into a temporary directory and renames it when complete, so a crash mid-write
leaves the previous checkpoints intact. Kept: the last `keep` saves plus the best by validation
loss. Nothing on the load path unpickles.

Every step also holds `checksums.json`, the sha256 of each of its files, written into the temporary
directory before orbax's rename so that a committed step always has one. A restore checks it first:
a truncated, garbled, bit-flipped or missing file makes the step damaged before orbax reads a byte.
Resuming skips a damaged step to the next older one and moves it aside as `damaged-<step>` (kept
for inspection, never taken again, and out of the way of the step's re-save).

A save the disk refuses (full, read-only) reaches the caller as one line naming the run directory
and the steps already committed, which it leaves as they were (`disk_error`); what orbax and
tensorstore would print of it on their own threads is held back.

Restores go into an abstract state from `jax.eval_shape`, after comparing every array's shape with
the checkpoint's metadata, so a checkpoint of another architecture is refused with each mismatched
path named before any data is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cnnjax import notices
from cnnjax.report import disk

CKPT_DIR = "ckpt"
CHECKSUMS = "checksums.json"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step still being written
# Orbax rewrites the step's own metadata (commit time) and writes its commit marker after the
# rename; they carry no array data and are left out of the checksums.
_UNSUMMED = {CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt"}


class DamagedCheckpoint(ValueError):
    """A step whose files do not match their checksums, or that orbax cannot read."""


class _QuietOrbax(logging.Filter):
    """Drops orbax's notices about read-only managers (our own choice, not a fault) and what it
    logs, traceback and all, of a write the disk refused: the failure comes back to the loop at
    the next save or wait, which reports it in one line (`disk_error`)."""

    NOTICES = ("read_only=True, setting save_interval_steps=0", "Given directory is read only",
               "did not provide metrics")  # most saves carry none: only improving epochs do

    def filter(self, record: logging.LogRecord) -> bool:
        if any(n in str(record.msg) for n in self.NOTICES):
            return False
        refused = record.exc_info and record.exc_info[1] is not None and disk.disk_error(
            record.exc_info[1], "", "") is not None
        return not refused


for _name in ("absl", "asyncio"):  # asyncio: the tasks of a failed save that nobody awaited
    logging.getLogger(_name).addFilter(_QuietOrbax())


def _quiet_closed_loop() -> None:
    """When a save fails, the writes orbax still had in flight end in the event loop it has just
    closed, and tensorstore reports each callback's 'Event loop is closed' as an unraisable
    exception, a traceback apiece: noise about a failure the loop reports in one line (at the
    next save or wait, so the hook must be in place before). Installed around whatever hook was
    there."""
    previous = sys.unraisablehook
    if getattr(previous, "cnnjax_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.cnnjax_quiet = True
    sys.unraisablehook = hook


def disk_error(err: BaseException, run_dir: pathlib.Path, written: list[int] | None = None
               ) -> disk.DiskError | None:
    """One line saying why the run directory cannot be written, that the checkpoints `written`
    before (by default those committed in it) are intact and how to go on; None when `err` is not
    about the disk."""
    written = committed_steps(pathlib.Path(run_dir) / CKPT_DIR) if written is None else written
    kept = (f"the checkpoints written before (steps {written[0]}..{written[-1]}) are intact"
            if written else "no checkpoint was written yet")
    return disk.disk_error(err, run_dir, f"Free space (or make it writable) and resume: cnnjax "
                                         f"train --resume {run_dir}", kept)


def committed_steps(directory: pathlib.Path) -> list[int]:
    """The steps in a checkpoint directory under their final names, whatever a manager holds in
    flight: what a failed save leaves intact."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


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


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checksums(step_dir: pathlib.Path) -> None:
    """Records the size and sha256 of every file under `step_dir` in its checksums.json."""
    files = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _sha256(p)]
             for p in sorted(step_dir.rglob("*"))
             if p.is_file() and p.relative_to(step_dir).as_posix() not in _UNSUMMED}
    tmp = step_dir / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, step_dir / CHECKSUMS)


def checksum_problems(step_dir: pathlib.Path) -> list[str] | None:
    """What in `step_dir` differs from its checksums.json; None when it has none (an older cnnjax)."""
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{CHECKSUMS} is unreadable ({err})"]
    problems = []
    for name, (size, digest) in files.items():
        p = step_dir / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != size:
            problems.append(f"{name} has {p.stat().st_size} bytes, {size} were written")
        elif _sha256(p) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


class Checkpointer:
    """The orbax CheckpointManager of one run directory."""

    def __init__(self, run_dir: pathlib.Path, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if not read_only:
            _quiet_closed_loop()
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {keep}.")
        self.directory = (pathlib.Path(run_dir) / CKPT_DIR).absolute()
        self.read_only, self.async_save = read_only, async_save
        self._saving: int | None = None  # the step whose save is in flight
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            # Only epochs that improved the monitored figure carry metrics, so the best of them
            # is the latest improvement, the same one early stopping picked.
            policies.BestN(get_metric_fn=_lower_is_better, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        # Saves always go through orbax's async checkpointer, whose finalization hook writes the
        # checksums before the rename; a synchronous save waits for it at once. `best_fn` makes
        # orbax write each save's metrics into the step (only then does a reopened manager, a
        # resumed run's, know which old step is the best and keep it).
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, best_fn=_lower_is_better, best_mode="min",
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums),
            cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "loop": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, loop: dict[str, Any], best: dict[str, float] | None = None
             ) -> float:
        """Starts saving (asynchronously where enabled); `best` ({'val_loss': 0.07} or
        {'val_accuracy': 0.98}, the monitored figure) marks a best-so-far candidate. Returns the
        seconds the caller was blocked (waiting for the previous save, writing a synchronous one)."""
        t0 = time.perf_counter()
        try:
            self.manager.wait_until_finished()  # one save in flight, so `_saving` names it
            self._saving = step
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)),
                metrics=None if best is None else {k: float(v) for k, v in best.items()},
                force=True)
            if not self.async_save:
                self.manager.wait_until_finished()
        except Exception as err:
            raise disk_error(err, self.directory.parent) or err
        return time.perf_counter() - t0

    def _record_checksums(self) -> None:
        """Orbax's post-finalization hook: the step's files are complete, not yet renamed."""
        if jax.process_index() != 0:
            return
        final = self.directory / str(self._saving)
        tmp = final.with_name(final.name + _TMP_SUFFIX)
        write_checksums(tmp if tmp.is_dir() else final)

    def wait(self) -> float:
        """Waits for a save in flight; returns the seconds waited."""
        t0 = time.perf_counter()
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise disk_error(err, self.directory.parent) or err
        return time.perf_counter() - t0

    def last_good_step(self) -> int | None:
        """The newest committed step once the save in flight is done, or None."""
        self.wait()
        steps = self.steps()
        return steps[-1] if steps else None

    def read_loop(self, step: int) -> dict[str, Any]:
        """The loop's JSON of `step`, verified, without restoring the train state."""
        self.verify(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                loop=ocp.args.JsonRestore()))["loop"]
        except Exception as err:  # orbax raises many types for damaged files
            raise DamagedCheckpoint(f"orbax cannot read {self.directory / str(step)} "
                                    f"({_first_line(err)})") from err

    def restore_as_stored(self, step: int) -> dict[str, Any]:
        """The train state of `step` as numpy arrays of the stored shapes, verified: no model or
        optimizer needed (a backbone may come from a run of any optimizer or class count)."""
        self.verify(step)
        try:
            meta = self.manager.item_metadata(step)["state"]
            target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta,
                                  is_leaf=lambda x: hasattr(x, "shape"))
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise DamagedCheckpoint(f"orbax cannot read {self.directory / str(step)} "
                                    f"({_first_line(err)})") from err

    def check_fits(self, step: int, abstract_state) -> None:
        """Raises ValueError naming every parameter path whose shape differs from the model's."""
        try:
            stored = shapes(self.manager.item_metadata(step)["state"])
        except Exception as err:  # orbax raises many types for unreadable metadata
            raise DamagedCheckpoint(f"its metadata is unreadable ({_first_line(err)})") from err
        if not stored:
            raise DamagedCheckpoint("its array metadata is missing")
        problems = shape_mismatches(stored, shapes(abstract_state))
        if problems:
            raise ValueError(f"checkpoint {self.directory / str(step)} does not fit the model:\n"
                             + "\n".join(problems) + "\nRestore it with the config it was trained "
                             "with (its run's config.json).")

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
        """(state, loop, step) of `step`, or of the newest intact checkpoint.

        Without `step`, a damaged checkpoint is skipped with a warning naming it, moved aside unless
        the checkpointer is read-only, and the next older one is tried.
        """
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train the run first "
                                    f"(cnnjax train).")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                        f"available steps: {steps}.")
            try:
                return self._restore(abstract_state, step) + (step,)
            except DamagedCheckpoint as err:
                others = [s for s in steps if s != step]
                raise DamagedCheckpoint(f"checkpoint {self.directory / str(step)} is damaged: {err} "
                                        f"(the run's other steps: {others}).") from None
        moved = []
        for candidate in reversed(steps):
            try:
                return self._restore(abstract_state, candidate) + (candidate,)
            except DamagedCheckpoint as err:
                moved.append(self._set_aside(candidate, err))
        where = f" (moved aside as {', '.join(moved)})" if not self.read_only else ""
        raise FileNotFoundError(f"every checkpoint in {self.directory} ({steps}) is damaged{where}; "
                                f"the run cannot be resumed: train it again into a new --run-dir.")

    def _set_aside(self, step: int, err: Exception) -> str:
        """Warns that `step` is damaged and, when writable, renames it so it is never taken again."""
        source, note = self.directory / str(step), "skipped"
        if not self.read_only and jax.process_index() == 0:
            n, target = 1, self.directory / f"damaged-{step}"
            while target.exists():
                n += 1
                target = self.directory / f"damaged-{step}-{n}"
            source.rename(target)
            self.manager.reload()
            note = f"moved aside to {target}"
        notices.warn(f"checkpoint {source} is damaged ({err}) and was {note}; trying the previous "
                      f"one.")
        return note.removeprefix("moved aside to ")

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints after `step`: a run resumed from an earlier one (a sweep's
        members, all from the step every one of them saved) writes them again."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            self.manager.delete(s)
        return later

    def verify(self, step: int) -> None:
        """Raises DamagedCheckpoint if a file of `step` differs from its checksums."""
        step_dir = self.directory / str(step)
        problems = checksum_problems(step_dir)
        if problems:
            raise DamagedCheckpoint("; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
        if problems is None:
            notices.warn(f"checkpoint {step_dir} has no {CHECKSUMS} (written by an older cnnjax): "
                          f"restored without verifying it.")

    def _restore(self, abstract_state, step: int) -> tuple[Any, dict[str, Any]]:
        self.verify(step)
        self.check_fits(step, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), loop=ocp.args.JsonRestore()))
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise DamagedCheckpoint(f"orbax cannot read it ({_first_line(err)})") from err
        return restored["state"], restored["loop"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _lower_is_better(metrics: dict[str, float]) -> float:
    """The best checkpoint's order: the validation loss, or the accuracy negated (checkpoints of
    earlier runs carry 'val_loss', which for val_accuracy runs held 1 - accuracy)."""
    if "val_accuracy" in metrics:
        return -metrics["val_accuracy"]
    return metrics["val_loss"]


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
