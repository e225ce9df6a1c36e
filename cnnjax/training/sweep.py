"""Many runs in one process: `cnnjax sweep --grid KEY=[v1,v2,...] ... --seeds N`.

`run_sweep(cfg, seeds, out_dir, lowering, grid)` trains every combination of the grid's values
(cnnjax/training/grid.py), or each of the value sets `points=` gives (a search's batch of trials),
with each seed, side by side, as members of one sweep:

    <out_dir>/sweep.json       the plan (config, grid, seeds, lowering) and each member's outcome
    <out_dir>/<member>/        a run directory of that member's config, as `cnnjax train` writes it

Each member is its own run: its config.json reproduces it (`cnnjax train --config
<member>/config.json`), `load_run` loads it and `cnnjax compare <out_dir>` ranks the members. It
gets what its own `cnnjax train` run gets: its keys, validation split and batch order from its
seed, the same step, and the loop's own pieces (cnnjax/training/loop.py: `open_run`, `start`,
`after_step`, `checkpoint_here`, `end_epoch`, `finish`) with the same callbacks but the progress
bar, so its metrics.jsonl, checkpoints and summary.json are that run's. Under 'loop' its
metrics.jsonl is the run's byte for byte; under 'vmap' and 'unroll' within float rounding.

Three lowerings (`SweepStep`): 'loop', each member's step by its own compiled `make_train_step`,
one member after another (the default on CPU, where it is the fastest); 'vmap', one
`jit(vmap(step))` over the members' stacked states (the default elsewhere); values the grid varies
ride as arrays beside each state (cnnjax/training/traced.py), so every member shares that one
program; 'unroll', the members' steps written one after another into one program.

A member leaves when it stops early (its run is finished there) or when a step's loss or gradient
is not finite (`diverged`, at that step; its last checkpoint stays), and the others go on; under
'vmap' and 'unroll' the smaller stack compiles once more. sweep.json and the printed table say who
left, why and at which step.

Every member checkpoints as its run does, all at the same steps. SIGTERM or Ctrl-C checkpoints
every member at the next step and stops (cnnjax/training/preempt.py). A sweep started again with
the same command, or `cnnjax sweep --resume DIR`, resumes every member from the last step all of
them saved (a kill may fall between two members' saves; the one ahead goes back a checkpoint:
members keep at least two), so that each member's metrics.jsonl is that of a sweep that never
stopped, byte for byte, whatever the lowering (a 'vmap' program's numbers depend on which members
it stacks, so members also stay in the stack until the step they left at).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnnjax.config import Config
from cnnjax.data import input_pipeline
from cnnjax.training import (builder, checkpoint, grid as grids, loop, parallel, preempt, rundir,
                             traced)
from cnnjax.training.builder import RunParts
from cnnjax.training.callbacks import CallbackList, default_callbacks
from cnnjax.training.grid import Plan
from cnnjax.training.loop_state import LoopState
from cnnjax.training.steps import TrainState, train_compiler_options

SWEEP_FILE = "sweep.json"


def default_lowering() -> str:
    """'loop' on CPU, the fastest there (benchmarks/sweep.py: vmap's grouped convolutions and the
    unrolled program measured 0.5-0.8x of it; docs/performance.md); 'vmap' elsewhere (not yet
    measured on a GPU: run benchmarks/sweep.py there and revisit)."""
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def stack(trees: Sequence[Any]) -> Any:
    """One tree whose leaves stack the given trees' leaves on a new leading (member) axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class SweepStep:
    """One train step of several members: `step(held, batches) -> (held, metrics)` with
    `batches[j]` and `metrics[j]` member j's. `held` is the members' train states as the lowering
    holds them: `pack(states)` makes it, `unpack(held)` gives the states back, `state(held, j)`
    member j's alone. A stacked lowering hands back host metrics (one transfer a step)."""

    lowering: str
    step: Callable[[Any, Sequence[dict]], tuple[Any, list[dict]]]
    pack: Callable[[Sequence[TrainState]], Any]
    unpack: Callable[[Any], list[TrainState]]
    state: Callable[[Any, int], TrainState]

    @property
    def stacked(self) -> bool:
        return self.lowering != "loop"

    def __call__(self, held, batches):
        return self.step(held, batches)


def make_sweep_step(lowering: str, parts: Sequence[RunParts], keys: Sequence[str] = ()
                    ) -> SweepStep:
    """The members' (`parts`, one each) step under `lowering`.

    'loop': each member's step by its run's compiled step, one after another; states stay apart.
    'vmap': `jit(vmap(step))` over the stacked states, batches and train keys, the state donated;
    with `keys` (grid keys of `traced.TRACEABLE`) the step reads those values from arrays stacked
    beside the states (`builder.traced_train_step`), else all members run `parts[0]`'s pure step
    (they differ in seed alone). Per-member kernels make every convolution a grouped one.
    'unroll': the members' pure steps written one after another into one program (no grouped
    convolutions; compile time grows with the members).
    """
    train_keys = [p.train_key for p in parts]
    if lowering == "loop":
        steps = [p.epoch_steps[0] for p in parts]

        def step(states, batches):
            outs = [steps[j](s, b, train_keys[j]) for j, (s, b) in enumerate(zip(states, batches))]
            return [o[0] for o in outs], [o[1] for o in outs]

        return SweepStep(lowering, step, list, list, lambda states, j: states[j])
    stacked_keys = jnp.stack(train_keys)
    if lowering == "vmap":
        if keys:
            values = stack([traced.values_of(p.cfg, tuple(keys)) for p in parts])
            body = builder.traced_train_step(parts[0], keys)
            program = jax.jit(jax.vmap(body), donate_argnums=0,
                              compiler_options=train_compiler_options())
            run = lambda state, batch: program(state, values, batch, stacked_keys)
        else:
            program = jax.jit(jax.vmap(parts[0].pure_train_step()), donate_argnums=0,
                              compiler_options=train_compiler_options())
            run = lambda state, batch: program(state, batch, stacked_keys)
    elif lowering == "unroll":
        pures = [p.pure_train_step() for p in parts]

        def unrolled(state, batch, rngs):
            outs = [pures[i](*jax.tree.map(lambda leaf: leaf[i], (state, batch, rngs)))
                    for i in range(len(pures))]
            return stack([o[0] for o in outs]), stack([o[1] for o in outs])

        program = jax.jit(unrolled, donate_argnums=0, compiler_options=train_compiler_options())
        run = lambda state, batch: program(state, batch, stacked_keys)
    else:
        raise ValueError(f"sweep lowering must be one of {grids.LOWERINGS}, got {lowering!r}.")
    n = len(parts)

    def step(state, batches):
        state, metrics = run(state, {k: jnp.stack([b[k] for b in batches]) for k in batches[0]})
        host = jax.device_get(metrics)  # one transfer for every member's metrics
        return state, [{k: v[j] for k, v in host.items()} for j in range(n)]

    return SweepStep(lowering, step, stack, lambda state: unstack(state, n),
                     lambda state, j: jax.tree.map(lambda leaf: leaf[j], state))


@dataclasses.dataclass
class MemberRun:
    """A member as it trains: the run's loop state as `cnnjax train` holds it for one run."""

    spec: grids.Member
    run: loop.RunSetup
    state: TrainState | None  # None while the state lives in a stacked lowering's `held`
    loop: LoopState
    callbacks: CallbackList
    step: int = 0  # updates applied (the state's step, kept on the host)
    window: loop.EpochWindow | None = None
    outcome: dict[str, Any] | None = None  # once it left: why, at which step, its figures
    closed: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


def run_sweep(cfg: Config, seeds: Sequence[int] | None, out_dir: pathlib.Path | str,
              lowering: str | None = None, grid: Mapping[str, Sequence] | None = None, *,
              points: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Trains every combination of `grid`'s values ({key: values}, grid.py says which keys), or
    each value set of `points` ([{key: value}, ...]: a search's batch of trials), with each of
    `seeds` (default: `cfg.train.seed` alone) into `out_dir`, each member a run directory of its
    own (see the module's docstring), resuming a sweep of the same plan found there. Returns
    sweep.json's content with `out_dir`; `preempted` names the signal that stopped it."""
    plan = grids.make_plan(cfg, [cfg.train.seed] if seeds is None else seeds,
                           lowering or default_lowering(), grid, points)
    with preempt.handling():
        return _Sweep(plan, pathlib.Path(out_dir)).run()


def resume_sweep(out_dir: pathlib.Path | str, progress: bool | None = None) -> dict[str, Any]:
    """Continues the sweep in `out_dir` with its own plan (its sweep.json); `progress` overrides
    train.progress (display only)."""
    out_dir = pathlib.Path(out_dir)
    plan = Plan.from_json(read_sweep(out_dir))
    if progress is not None:
        plan = dataclasses.replace(plan, config=plan.config.set("train.progress", progress))
    with preempt.handling():
        return _Sweep(plan, out_dir).run()


def read_sweep(out_dir: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a sweep directory (cnnjax "
                                f"sweep writes {SWEEP_FILE} there).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None


class _Sweep:
    """One sweep's run: its members, the step they share and the sweep's file."""

    def __init__(self, plan: Plan, out_dir: pathlib.Path):
        self.plan, self.out_dir, self.started = plan, out_dir, time.perf_counter()
        self.specs = plan.members()
        self.members: list[MemberRun] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.rates: list[float] = []
        self.first_step_s: float | None = None
        self._steps: dict[tuple[str, ...], SweepStep] = {}
        self.preempted: str | None = None

    # --- the sweep's file -------------------------------------------------------------------

    def write(self, status: str) -> dict[str, Any]:
        """sweep.json: the plan, each member's outcome so far, and the sweep's figures; written
        whole and renamed into place, so a kill leaves the previous one."""
        members = []
        for spec in self.specs:
            members.append({"name": spec.name, "values": dict(spec.values), "seed": spec.seed,
                            **self.outcomes.get(spec.name, {"status": "training"})})
        finished = [m for m in members if "test" in m]
        accuracy = [m["test"]["accuracy"] for m in finished]
        record = {**self.plan.to_json(), "traced": list(self.plan.traced) if
                  self.plan.lowering == "vmap" else [], "status": status,
                  "monitor": self.plan.config.train.monitor, "members": members,
                  "left": [{k: m[k] for k in ("name", "status", "reason", "step")}
                           for m in members if m.get("reason")],
                  "keys": list(self.plan.keys), "groups": _groups(finished, self.plan.keys),
                  "test_accuracy_mean": statistics.mean(accuracy) if accuracy else None,
                  "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                  "aggregate_train_images_per_s": (statistics.median(self.rates[1:] or self.rates)
                                                   if self.rates else None),
                  "first_step_s": self.first_step_s,
                  "wall_time_s": time.perf_counter() - self.started}
        path = self.out_dir / SWEEP_FILE
        tmp = path.with_name(SWEEP_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return record

    def _check_same_plan(self) -> dict[str, Any] | None:
        """The outcomes recorded by an earlier start of this sweep (None: there was none);
        refuses another plan."""
        path = self.out_dir / SWEEP_FILE
        if not path.exists():
            return None
        saved = read_sweep(self.out_dir)
        wanted, theirs = self.plan.to_json(), {k: saved.get(k) for k in self.plan.to_json()}
        theirs["config"] = Config.from_dict(theirs["config"]).to_dict()
        diffs = [k for k in wanted if k != "config" and wanted[k] != theirs[k]]
        diffs += rundir.config_differences(Config.from_dict(theirs["config"]), self.plan.config)
        if diffs:
            raise ValueError(f"{self.out_dir} holds a sweep of another plan (differs in: "
                             f"{'; '.join(diffs)}); resume it with cnnjax sweep --resume "
                             f"{self.out_dir}, or choose another --out.")
        if saved.get("status") == "finished":
            raise FileExistsError(f"{self.out_dir} already holds a finished sweep; choose another "
                                  f"--out.")
        return {m["name"]: {k: v for k, v in m.items() if k not in ("name", "values", "seed")}
                for m in saved["members"] if m.get("status") != "training"}

    # --- opening the members ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if jax.process_count() > 1:
            raise ValueError("cnnjax sweep runs in one process; train multi-process runs with "
                             "cnnjax train.")
        recorded = self._check_same_plan()
        parts = self._build()  # every member's config checked before a directory is made
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rundir.lock_run_dir(self.out_dir)  # one writer per sweep directory, as for a run's
        try:
            self._open(parts, recorded)
            self.write("training")
            self._train()
            record = self.write("preempted" if self.preempted else "finished")
        finally:
            for m in self.members:
                self._close(m)
            rundir.close_run_dir(self.out_dir)
        # a signal during the members' last evaluation stops nothing, but is reported
        return {**record, "out_dir": str(self.out_dir),
                "preempted": self.preempted or preempt.requested()}

    def _build(self) -> list[RunParts]:
        """Each member's data (one load per seed) and parts (one build per config apart from the
        seed); checks the grid's program (abstractly) under 'vmap'. Nothing compiles here."""
        tc = self.plan.config.train
        self.data = {seed: input_pipeline.load_data(self.plan.config.data, seed)
                     for seed in self.plan.seeds}
        lengths = {input_pipeline.steps_per_epoch(len(d.train[1]), tc.batch_size)
                   for d in self.data.values()}
        if len(lengths) > 1:
            raise ValueError(f"the seeds' training splits give {sorted(lengths)} steps per epoch "
                             f"(data.classes keeps a seeded share of each class); a sweep steps "
                             f"its members together: train each seed with cnnjax train instead.")
        # one device: the members share it, and a member's run is a one-device run
        self.par = parallel.DataParallel(Mesh(np.asarray(jax.devices()[:1]), (parallel.AXIS,)))
        spec = self.data[self.plan.seeds[0]].spec
        sizes = loop.eval_sizes(self.par, self.data[self.plan.seeds[0]], tc.eval_batch_size)
        parts = builder.build_members([s.config for s in self.specs], spec, lengths.pop(),
                                      sharding=self.par.replicated, eval_rows=sizes["val"])
        if self.plan.lowering == "vmap" and self.plan.traced:
            self._check_program(parts)
        return parts

    def _check_program(self, parts: Sequence[RunParts]) -> None:
        """Traces the members' one program abstractly (nothing is compiled), so a value that
        cannot be an array in it (a user's optimizer that branches on its learning rate) is
        named before the members' directories exist."""
        images = self.data[self.plan.seeds[0]].train[0]
        rows, n = self.plan.config.train.batch_size, len(parts)
        batch = {"image": jax.ShapeDtypeStruct((n, rows, *images.shape[1:]), images.dtype),
                 "label": jax.ShapeDtypeStruct((n, rows), jnp.int32),
                 "index": jax.ShapeDtypeStruct((n, rows), jnp.int32)}
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype),
                             parts[0].abstract)
        values = {k: jax.ShapeDtypeStruct((n,), jnp.float32) for k in self.plan.traced}
        keys = jax.eval_shape(lambda: jnp.stack([p.train_key for p in parts]))
        try:
            jax.eval_shape(jax.vmap(builder.traced_train_step(parts[0], self.plan.traced)),
                           state, values, batch, keys)
        except (jax.errors.JAXTypeError, TypeError, ValueError) as err:
            raise ValueError(f"--grid {', '.join(self.plan.traced)} cannot vary within one 'vmap' "
                             f"program with this config: {str(err).splitlines()[0]}; use "
                             f"--lowering loop (each member its own program).") from None

    def _open(self, parts: Sequence[RunParts], recorded: dict[str, dict] | None) -> None:
        """Opens every member not finished, all at the last step every one of them saved."""
        self.outcomes = dict(recorded or {})
        step, at_step, to_finish = self._resume_step(recorded or {})
        for spec, p in zip(self.specs, parts):
            run_dir = self.out_dir / spec.name
            if spec.name not in at_step and spec.name not in to_finish:
                continue
            self.outcomes.pop(spec.name, None)
            if spec.name in at_step and step == 0 and run_dir.exists() and recorded is not None:
                shutil.rmtree(run_dir)  # this sweep's fresh start: one that saved starts over too
            run, state, member_loop = loop.open_run(
                p, self.data[spec.seed], self.par, run_dir, self.started,
                step=step if spec.name in at_step and step > 0 else None,
                keep=max(2, p.cfg.train.keep_checkpoints), announce=False)
            hooks = CallbackList(default_callbacks(p.cfg, progress=False))
            member = MemberRun(spec, run, state, member_loop, hooks, step=int(state.step))
            self.members.append(member)
            member.loop = loop.start(run, state, member_loop, hooks)
        if step > 0:
            print(f"resuming sweep {self.out_dir} from step {step}: {len(self.members)} members "
                  f"training, {len(self.outcomes)} left", flush=True)
        positions = {(m.loop.epoch, m.loop.batch) for m in self.members
                     if list(m.run.epochs(m.loop))}
        assert len(positions) <= 1, positions  # lockstep: every member at the same step

    def _resume_step(self, recorded: dict[str, dict]) -> tuple[int, set[str], set[str]]:
        """(S, the members to open at step S, those to open at their latest to finish): S is the
        newest step that every member still training at S saved (0: all start afresh). A member
        that left (stopped early, diverged) after S is opened at S too, to leave again at the
        same step: under 'vmap' the others' numbers depend on which members share their program.
        One that stopped early at or before S, its summary not yet written, is finished."""
        latest, left_at = {}, {}
        for spec in self.specs:
            run_dir = self.out_dir / spec.name
            if (run_dir / "summary.json").exists():
                left_at[spec.name] = int(rundir.read_summary(run_dir)["steps"])
            outcome = recorded.get(spec.name, {})
            if outcome.get("status") in ("diverged", "stopped"):
                left_at[spec.name] = int(outcome["step"])
            steps, saved = _latest(run_dir) if rundir.has_checkpoint(run_dir) else ([], {})
            latest[spec.name] = steps[-1] if steps else 0
            done_training = saved and (saved.get("stopped_early") or
                                       int(saved["epoch"]) > self.plan.config.train.epochs)
            if done_training and spec.name not in left_at:
                left_at[spec.name] = steps[-1]
        training = [latest[s.name] for s in self.specs if s.name not in left_at]
        step = min(training) if training else max(latest.values(), default=0)
        while True:  # those that left after S are back in, and may have saved less far
            at_step = {s.name for s in self.specs if left_at.get(s.name, float("inf")) > step}
            lower = min((latest[n] for n in at_step), default=step)
            if lower >= step:
                break
            step = lower
        for name in {s.name for s in self.specs} - at_step:  # done at or before S
            if name not in self.outcomes and (self.out_dir / name / "summary.json").exists():
                self.outcomes[name] = _finished(rundir.read_summary(self.out_dir / name))
        to_finish = {s.name for s in self.specs if s.name not in at_step | set(self.outcomes)}
        return step, at_step, to_finish

    # --- training ---------------------------------------------------------------------------

    def _step_for(self, members: Sequence[MemberRun]) -> SweepStep:
        names = tuple(m.name for m in members)
        if names not in self._steps:
            self._steps = {names: make_sweep_step(
                self.plan.lowering, [m.run.parts for m in members],
                self.plan.traced if self.plan.lowering == "vmap" else ())}
        return self._steps[names]

    def _train(self) -> None:
        while True:
            active = [m for m in self.members if m.outcome is None]
            finished_training = [m for m in active if not list(m.run.epochs(m.loop))]
            if finished_training:
                self._finish(finished_training)
                continue
            if not active:
                return
            if not self._epoch(active):
                return

    def _epoch(self, members: list[MemberRun]) -> bool:
        """One epoch of `members` (from where they stand), its end included; False when a
        signal stopped the sweep."""
        epoch = members[0].loop.epoch
        t_epoch, stepped = time.perf_counter(), list(members)
        for m in members:
            m.window, m.loop = loop.open_epoch(m.run, m.loop, m.step)
        sweep_step = self._step_for(members)
        held = sweep_step.pack([m.state for m in members])
        for m in members:  # the step donates what `held` holds
            m.state = None
        streams = [loop.epoch_batches(m.run, m.loop) for m in members]
        images = 0
        while batches := [b for b in (next(s, None) for s in streams) if b is not None]:
            t_step = time.perf_counter()
            held, metrics = sweep_step(held, batches)
            if self.first_step_s is None:
                jax.block_until_ready(held)
                self.first_step_s = time.perf_counter() - t_step
            for m in members:
                m.loop = loop.first_step_timed(m.loop, self.first_step_s)
            images += len(members) * self.plan.config.train.batch_size
            signal = preempt.requested()
            diverged, saving = [], []
            for j, m in enumerate(members):
                m.step += 1
                state = None if sweep_step.stacked else held[j]
                try:
                    m.loop, here = loop.after_step(
                        m.run, state, m.loop, m.callbacks, m.window, metrics[j], signal=signal,
                        step=m.step if sweep_step.stacked else None)
                except FloatingPointError as err:
                    diverged.append((j, m, err))
                    continue
                if here:
                    saving.append(j)
            if saving:  # every member's previous save is done before any starts its next
                self._wait(members)
            for j in saving:
                m = members[j]
                m.loop = loop.checkpoint_here(m.run, sweep_step.state(held, j), m.loop,
                                              m.callbacks, m.window)
            if signal:  # every member checkpointed at this step
                self.preempted = signal
                return False
            stopped = [j for j, m in enumerate(members) if m.loop.stop_reason]
            if diverged or stopped:
                states = sweep_step.unpack(held)
                for j, m, err in diverged:
                    self._leave(m, "diverged", str(err), getattr(err, "step", m.step))
                for j in stopped:
                    members[j].state = states[j]
                    self._leave(members[j], "stopped", members[j].loop.stop_reason,
                                members[j].step)
                kept = [j for j, m in enumerate(members) if m.outcome is None]
                members = [members[j] for j in kept]
                streams = [streams[j] for j in kept]
                if not members:
                    return True
                sweep_step = self._step_for(members)
                held = sweep_step.pack([states[j] for j in kept])
        seconds = time.perf_counter() - t_epoch
        self.rates.append(images / seconds)
        for m, state in zip(members, sweep_step.unpack(held)):
            m.state = state
            m.loop = loop.end_train(m.run, m.loop, m.window)
        self._wait(members)
        for m in members:
            m.state, m.loop = loop.end_epoch(m.run, m.state, m.loop, m.callbacks)
        self._report(epoch, stepped, members)
        signal = preempt.requested()
        if signal:  # every member saved at this epoch's end
            self.preempted = signal
            return False
        return True

    def _report(self, epoch: int, stepped: Sequence[MemberRun], members: Sequence[MemberRun]
                ) -> None:
        if not self.plan.config.train.progress:
            return
        monitor = self.plan.config.train.monitor
        values = [m.loop.best.value for m in members if m.loop.best.value is not None] or [np.nan]
        best = min(values) if monitor == "val_loss" else max(values)
        left = [m.name for m in stepped if m.outcome is not None or m.loop.stopped_early]
        print(f"epoch {epoch:3d}  {len(members)} member{'s' * (len(members) != 1)}  best "
              f"{monitor} {best:.4f} (the best member's), {statistics.mean(values):.4f} (mean)  "
              f"{self.rates[-1]:.0f} images/s" + (f"  leaving: {', '.join(left)}" if left else ""),
              flush=True)

    def _wait(self, members: Sequence[MemberRun]) -> None:
        for m in members:
            if not m.closed:
                m.run.ckpt.wait()

    def _finish(self, members: Sequence[MemberRun]) -> None:
        """Ends the runs of members done training (stopped early, or all epochs run): every
        member's saves are written first, so that a resume finds them all at this step."""
        self._wait(self.members)
        for m in members:
            result = loop.finish(m.run, m.state, m.loop, m.callbacks)
            self._close(m)
            m.outcome = _finished(result.summary)
            self.outcomes[m.name] = m.outcome
        self.write("training")

    def _leave(self, m: MemberRun, status: str, reason: str, step: int) -> None:
        """A member leaves before its end (its loss or gradient not finite, or a callback's
        stop); its checkpoints stay, its run resumable with cnnjax train --resume."""
        m.outcome = {"status": status, "reason": reason, "step": step}
        self.outcomes[m.name] = m.outcome
        self._close(m)
        self.write("training")
        if self.plan.config.train.progress:
            print(f"{m.name} left at step {step}: {reason}", flush=True)

    def _close(self, m: MemberRun) -> None:
        """Closes a member's logs, waits for its last save and gives its directory's lock back."""
        if not m.closed:
            m.closed = True
            m.callbacks.close()
            m.run.ckpt.close()
            rundir.close_run_dir(m.run.run_dir)


def _latest(run_dir: pathlib.Path) -> tuple[list[int], dict[str, Any]]:
    """A member's checkpoint steps and the loop state saved with the newest."""
    ckpt = checkpoint.Checkpointer(run_dir, read_only=True)
    try:
        steps = ckpt.steps()
        return steps, ckpt.read_loop(steps[-1]) if steps else {}
    finally:
        ckpt.close()


def _finished(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A finished member's outcome, from its summary.json."""
    out = {"status": "finished", "best_epoch": summary["best_epoch"],
           "best_step": summary["best_step"], "epochs_run": summary["epochs_run"],
           "steps": summary["steps"], "val": _short(summary["val"]),
           "test": _short(summary["test"])}
    if summary["stopped_early"]:
        out.update(reason=f"stopped early after epoch {summary['epochs_run']} (no better "
                          f"{summary['monitor']} since epoch {summary['best_epoch']})",
                   step=summary["steps"])
    return out


def _short(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("loss", "accuracy", "count")}


def _groups(finished: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Test accuracy over the seeds of each value set."""
    if not keys:
        return []
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for m in finished:
        groups.setdefault(json.dumps([m["values"][k] for k in keys]), []).append(m)
    out = []
    for combo, ms in groups.items():
        accuracy = [m["test"]["accuracy"] for m in ms]
        out.append({"values": dict(zip(keys, json.loads(combo))), "seeds": [m["seed"] for m in ms],
                    "test_accuracy_mean": statistics.mean(accuracy),
                    "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0})
    return out
