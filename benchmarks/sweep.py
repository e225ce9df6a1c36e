"""Aggregate training throughput of N seeds: cnnjax sweep's lowerings against N sequential runs.

    python benchmarks/sweep.py                          # seeds 8, batch 128; about 1-2 min on 2 CPU cores
    python benchmarks/sweep.py --seeds 4 --batch-size 32 --json out.json

Ways to train N seed CNNs (cnnjax's train step, default optimizer) one step each, alternated
in one process (the machine is noisy; compare medians):
- sequential: N single-seed jitted steps, one after another (what N `cnnjax train` runs cost on
  one machine, without their process start-up);
- loop: `cnnjax.training.sweep.loop_step`, cnnjax sweep's default on CPU: the single-seed step for each
  seed in turn, inside the sweep's bookkeeping (stacked batches and metrics);
- vmap: `cnnjax.training.sweep.make_sweep_step`, i.e. jit(vmap(train_step)) over stacked states, batches and
  keys; convolutions become grouped (batched) convolutions;
- unroll: `make_sweep_step(..., 'unroll')`: the N steps written out in one program;
- map: jit of `lax.map(train_step)` over the seed axis: one program, the seeds' steps run one after
  another inside it (no grouped convolutions).
Reported as aggregate images/s (N x batch per step) and the first call's seconds (compile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from cnnjax import Config, DatasetSpec, build, seed_keys
from cnnjax.training.steps import train_compiler_options
from cnnjax.training.sweep import init_states, loop_step, make_sweep_step, unstack

IMAGE_SHAPE, MEAN, STD = (28, 28, 1), 0.1307, 0.3081
SPEC = DatasetSpec("mnist", 10, IMAGE_SHAPE, MEAN, STD, ("train", "test"), False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    n, bs = args.seeds, args.batch_size
    parts = build(Config(), SPEC, steps_per_epoch=1)
    # the body with the passes `cnnjax sweep` would use; the single step splits batches the same way
    body = parts.pure_train_step()  # its passes: grad_passes(bs)
    single_step = parts.epoch_steps[0]
    rng = np.random.default_rng(0)
    batches = [[{"image": rng.integers(0, 256, (bs, *IMAGE_SHAPE), dtype=np.uint8),
                 "label": rng.integers(0, 10, bs).astype(np.int32),
                 "index": np.arange(bs, dtype=np.int32)} for _ in range(n)]
               for _ in range(args.steps + 1)]
    stacked = [{k: np.stack([b[k] for b in step]) for k in step[0]} for step in batches]
    seeds = list(range(n))

    singles = [parts.init_state(seed_keys(s)[0]) for s in seeds]
    train_keys = [seed_keys(s)[1] for s in seeds]
    vstate, vkeys = init_states(parts, seeds)
    mstate, _ = init_states(parts, seeds)
    ustate, _ = init_states(parts, seeds)
    vstep, ustep = make_sweep_step(body, "vmap"), make_sweep_step(body, "unroll")
    lstep = loop_step(single_step)
    lstate, lkeys = init_states(parts, seeds)
    lstate, lkeys = lstep.pack(unstack(lstate, n), list(lkeys))
    mstep = jax.jit(lambda st, b, k: jax.lax.map(lambda a: body(*a), (st, b, k)), donate_argnums=0,
                    compiler_options=train_compiler_options())

    def run_sequential(step_batches):
        for per_seed in step_batches:
            for i in range(n):
                singles[i], _ = single_step(singles[i], per_seed[i], train_keys[i])
        jax.block_until_ready(singles)

    state = {"loop": lstate, "vmap": vstate, "unroll": ustate, "map": mstate}

    def runner(name, step, keys=vkeys):
        def run(step_batches):
            for b in step_batches:
                state[name], _ = step(state[name], b, keys)
            jax.block_until_ready(state[name])
        return run

    ways = {"sequential": (run_sequential, batches), "loop": (runner("loop", lstep, lkeys), stacked),
            "vmap": (runner("vmap", vstep), stacked), "unroll": (runner("unroll", ustep), stacked),
            "map": (runner("map", mstep), stacked)}
    compile_s, rates = {}, {name: [] for name in ways}
    for name, (run, data) in ways.items():
        start = time.perf_counter()
        run(data[:1])
        compile_s[name] = time.perf_counter() - start
    for repeat in range(args.repeats):
        for name in (list(ways) if repeat % 2 == 0 else list(ways)[::-1]):
            run, data = ways[name]
            start = time.perf_counter()
            run(data[1:])
            rates[name].append(n * bs * args.steps / (time.perf_counter() - start))
    report = {"args": vars(args), "device": str(jax.devices()[0]), "compile_s": compile_s,
              "images_per_s": rates}
    print(f"{n} seeds, batch {bs} each, on {report['device']}; aggregate train images/s, "
          f"median (min–max) of {args.repeats} alternating repeats of {args.steps} steps\n")
    print("| way | images/s | vs sequential | first call (s) |\n|---|---:|---:|---:|")
    base = statistics.median(rates["sequential"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:,.0f} ({min(values):,.0f}–{max(values):,.0f}) | "
              f"{med / base:.2f}x | {compile_s[name]:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
