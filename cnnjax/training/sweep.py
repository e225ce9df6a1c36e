"""Many seeds in one process: `cnnjax sweep --seeds N`.

`run_sweep(cfg, seeds, out_dir)` trains one `cnnjax train` run of `cfg` per seed, side by side, and
writes each seed's metrics.jsonl as that run would (tests/test_sweep.py compares them). Every seed
gets exactly what its own run gets:
- its init and train keys, `init, train = split(key(seed))`, its own train/validation split and
  batch order, and the same train step (in the passes `steps.grad_passes` gives the run's batch),
  so its dropout and augmentation draws are its run's;
- its own plateau rule and early stopping on its own validation loss; a seed that stops leaves the
  sweep, and its best-validation parameters are the ones evaluated at the end.
Three lowerings (`SweepStep`): 'loop', each seed's step by the one compiled `make_train_step`, one
seed after another (the default on CPU, where it is the fastest); 'vmap', `jit(vmap(train_step))`
over states stacked on a leading seed axis (per-seed kernels make every convolution a grouped one;
the default elsewhere); 'unroll', the seeds' steps written out one after another in one program.
Under the last two a stopping seed costs one recompile for the smaller stack.

Not in a sweep (each is one `cnnjax train` away): checkpoints and resume, transfer learning,
multi-device data parallelism.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import input_pipeline
from cnnjax.report import logs as report
from cnnjax.config import Config
from cnnjax.training import builder, loop, rundir
from cnnjax.training.builder import RunParts
from cnnjax.training.loop_state import Best, LoopState
from cnnjax.training.steps import evaluate, train_compiler_options


def stack(trees: Sequence[Any]) -> Any:
    """One tree whose leaves stack the given trees' leaves on a new leading (seed) axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(n)]


def init_states(parts: RunParts, seeds: Sequence[int]):
    """The stacked train states (each from its seed's init key) and the stacked train keys."""
    keys = [builder.seed_keys(s) for s in seeds]
    return stack([parts.init_state(k[0]) for k in keys]), jnp.stack([k[1] for k in keys])


LOWERINGS = ("loop", "vmap", "unroll")


def default_lowering() -> str:
    """'loop' on CPU, the fastest there (benchmarks/sweep.py: vmap's grouped convolutions and the
    unrolled program measured 0.5-0.8x of it; docs/performance.md); 'vmap' elsewhere (not yet
    measured on a GPU: run benchmarks/sweep.py there and revisit)."""
    return "loop" if jax.default_backend() == "cpu" else "vmap"


@dataclasses.dataclass(frozen=True)
class SweepStep:
    """One step of every seed, `(state, batch, keys) -> (state, metrics)`, with the batch stacked
    on a leading seed axis and `metrics[name][seed]`. `state` and `keys` are the seeds' train
    states and keys as this lowering holds them: `pack(states, keys)` makes them from per-seed
    lists, `unpack(state)` gives the list of states back."""

    step: Callable
    pack: Callable[[Sequence[Any], Sequence[jax.Array]], tuple[Any, Any]]
    unpack: Callable[[Any], list[Any]]

    def __call__(self, state, batch, keys):
        return self.step(state, batch, keys)


def loop_step(train_step: Callable) -> SweepStep:
    """'loop': each seed's step by `train_step` (`make_train_step`'s: one compile serves every
    seed, and its passes run as separate executions), one seed after another; states stay apart."""

    def step(states, batch, keys):
        outs = [train_step(state, {k: v[i] for k, v in batch.items()}, keys[i])
                for i, state in enumerate(states)]
        # metrics[name][seed] as in the stacked lowerings, without a device op per step to stack
        return [o[0] for o in outs], {k: [o[1][k] for o in outs] for k in outs[0][1]}

    def pack(states, keys):
        # The step donates its state, and a seed's best state may share its buffers: copies.
        return [jax.tree.map(jnp.copy, s) for s in states], list(keys)

    return SweepStep(step, pack, list)


def make_sweep_step(train_step: Callable, lowering: str) -> SweepStep:
    """One compiled program over the stacked states of all seeds, the state donated.

    'vmap': `jit(vmap(train_step))`; per-seed kernels make every convolution a grouped one, whose
    backward XLA:CPU runs slowly. 'unroll': the seeds' steps written out one after another in the
    same program (no grouped convolutions, no while loop; compile time grows with the seed count).
    Both compute each seed's step as the pure step (`make_train_step(..., compiled=False)`) does.
    """
    if lowering == "vmap":
        step = jax.jit(jax.vmap(train_step), donate_argnums=0,
                       compiler_options=train_compiler_options())
    elif lowering == "unroll":
        def unrolled(state, batch, keys):
            n = keys.shape[0]
            outs = [train_step(*jax.tree.map(lambda leaf: leaf[i], (state, batch, keys)))
                    for i in range(n)]
            return stack([o[0] for o in outs]), stack([o[1] for o in outs])

        step = jax.jit(unrolled, donate_argnums=0, compiler_options=train_compiler_options())
    else:
        raise ValueError(f"a one-program sweep lowering is 'vmap' or 'unroll', got {lowering!r}.")
    return SweepStep(step, lambda states, keys: (stack(states), jnp.stack(list(keys))),
                     lambda tree: unstack(tree, jax.tree.leaves(tree)[0].shape[0]))


def stacked_batches(datas, batch_size: int, seeds: Sequence[int], epoch: int):
    """Per step, each seed's own next batch (its `train_batches` order), stacked on axis 0."""
    streams = [input_pipeline.train_batches(*d.train, batch_size, s, epoch)
               for d, s in zip(datas, seeds)]
    for batches in zip(*streams):
        yield {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def run_sweep(cfg: Config, seeds: Sequence[int], out_dir: pathlib.Path | str,
              lowering: str | None = None) -> dict[str, Any]:
    """Trains one run of `cfg` per seed side by side (see `SweepStep`) and returns the summary.

    Writes config.json, summary.json (each seed's best epoch, validation and test metrics, their
    mean and standard deviation, aggregate images/s) and seed_<S>/metrics.jsonl into `out_dir`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"a sweep needs distinct seeds, got {seeds}.")
    if cfg.transfer.active:
        raise ValueError("cnnjax sweep does not support transfer learning (cfg.transfer); train "
                         "each seed with cnnjax train instead.")
    lowering = lowering or default_lowering()
    if lowering not in LOWERINGS:
        raise ValueError(f"sweep lowering must be one of {LOWERINGS}, got {lowering!r}.")
    tc = cfg.train
    builder.check_lengths(cfg)
    out_dir = pathlib.Path(out_dir)
    if (out_dir / "summary.json").exists():
        raise FileExistsError(f"{out_dir} already holds a finished sweep; choose another directory.")
    t_start = time.perf_counter()
    datas = [input_pipeline.load_data(cfg.data, s) for s in seeds]  # each seed's own val split
    lengths = {input_pipeline.steps_per_epoch(len(d.train[1]), tc.batch_size) for d in datas}
    if len(lengths) > 1:
        raise ValueError(f"the seeds' training splits give {sorted(lengths)} steps per epoch "
                         f"(data.classes keeps a seeded share of each class); a sweep steps its "
                         f"seeds together: train each with cnnjax train instead.")
    # The seeds' configs differ in train.seed alone, which no part depends on: one build serves all.
    parts = builder.build(cfg, datas[0].spec, lengths.pop())
    n_steps = parts.steps_per_epoch
    if lowering == "loop":
        step = loop_step(parts.epoch_steps[0])
    else:
        step = make_sweep_step(parts.pure_train_step(), lowering)
    out_dir.mkdir(parents=True, exist_ok=True)
    rundir.lock_run_dir(out_dir)  # one writer per sweep directory, as for a run's
    (out_dir / "config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")

    def eval_split(state, i: int, split: str) -> dict[str, Any]:
        images, labels = getattr(datas[i], split)
        # batches as `cnnjax train` makes them on one device, so the sums add in the same order
        return evaluate(parts.eval_step, parts.evaluated(state), input_pipeline.eval_batches(
            images, labels, min(tc.eval_batch_size, len(labels))))

    stacked, keys = init_states(parts, seeds)
    states, train_keys = unstack(stacked, len(seeds)), list(keys)
    loops = [LoopState(best=Best(tc.monitor)) for _ in seeds]
    best_states: list[Any] = [None for _ in seeds]
    for s in seeds:
        (out_dir / f"seed_{s}").mkdir(exist_ok=True)
    logs = [report.JsonlWriter(out_dir / f"seed_{s}" / "metrics.jsonl") for s in seeds]
    active, rates, first_step_s = list(range(len(seeds))), [], None
    try:
        for epoch in range(1, tc.epochs + 1):
            if not active:
                break
            state, keys = step.pack([states[i] for i in active], [train_keys[i] for i in active])
            t_epoch, window = time.perf_counter(), []
            for batch in stacked_batches([datas[i] for i in active], tc.batch_size,
                                         [seeds[i] for i in active], epoch):
                t_step = time.perf_counter()
                state, metrics = step(state, batch, keys)
                if first_step_s is None:
                    jax.block_until_ready(state)
                    first_step_s = time.perf_counter() - t_step
                window.append(metrics)
            window = jax.device_get(window)  # one host sync per epoch
            rates.append(n_steps * tc.batch_size * len(active) / (time.perf_counter() - t_epoch))
            stepped = list(active)
            for j, (i, state_i) in enumerate(zip(stepped, step.unpack(state))):
                before = loops[i].best.step
                states[i], loops[i] = _member_epoch(parts, j, window, state_i, loops[i], logs[i],
                                                    lambda s, i=i: eval_split(s, i, "val"))
                if loops[i].best.step != before or best_states[i] is None:
                    best_states[i] = state_i
                if loops[i].stopped_early:
                    active.remove(i)
            if tc.progress:
                values = [loops[i].best.value for i in stepped]
                print(f"epoch {epoch:3d}  {len(stepped)} seeds  best {tc.monitor} "
                      f"{statistics.mean(values):.4f} (mean)  {rates[-1]:.0f} images/s"
                      + (f"  stopped: {[seeds[i] for i in stepped if i not in active]}"
                         if len(active) < len(stepped) else ""), flush=True)
    finally:
        for log in logs:
            log.close()
        rundir.close_run_dir(out_dir)

    per_seed = []
    for i, seed in enumerate(seeds):
        val, test = eval_split(best_states[i], i, "val"), eval_split(best_states[i], i, "test")
        per_seed.append({"seed": seed, "best_epoch": loops[i].best.epoch,
                         "best_step": loops[i].best.step, "epochs_run": loops[i].epoch - 1,
                         "val": _short(val), "test": _short(test)})
    test_acc = [p["test"]["accuracy"] for p in per_seed]
    summary = {
        "seeds": seeds, "lowering": lowering, "monitor": tc.monitor,
        "grad_passes_per_step": parts.passes, "per_seed": per_seed,
        "test_accuracy_mean": statistics.mean(test_acc),
        "test_accuracy_std": statistics.stdev(test_acc) if len(test_acc) > 1 else 0.0,
        "aggregate_train_images_per_s": statistics.median(rates[1:] or rates),
        "first_step_s": first_step_s, "wall_time_s": time.perf_counter() - t_start,
    }
    report.write_json(out_dir / "summary.json", summary)
    return {**summary, "out_dir": str(out_dir)}


def _short(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("loss", "accuracy", "count")}


def _member_epoch(parts: RunParts, j: int, window, state, member: LoopState, log, validate
                  ) -> tuple[Any, LoopState]:
    """A member's (stack position j) end of epoch, as `cnnjax train` ends it (`loop.StepLog` and
    `loop.close_epoch`): step records, validation, early stopping, plateau rule, epoch record."""
    step_log = loop.StepLog(parts.cfg.train.log_every, int(state.step) - len(window) + 1)
    epoch_steps: list[tuple[float, float]] = []
    for t, metrics in enumerate(window):
        if step_log.add({k: v[j] for k, v in metrics.items()}) or t == len(window) - 1:
            record, steps = step_log.pull(member.epoch)
            epoch_steps += steps
            log.write(record)
    state, member, record = loop.close_epoch(parts, state, member, validate(state), epoch_steps)
    log.write(record)
    return state, member
