"""Aggregate train throughput of K sweep members: cnnjax sweep's lowerings vs K sequential runs.

    python benchmarks/sweep.py                       # K = 8 learning rates x dropout 0/0.5
    python benchmarks/sweep.py --members 32 --steps 2
    python benchmarks/sweep.py --values seeds --members 8 --batch-size 32 --json out.json

K members of the seed CNN (default config, batch 128), one train step each, alternated in one
process (the machine is noisy; compare medians). `--values grid` (default): member i has learning
rate 1e-4 * 100^(i / (K - 1)) and dropout 0 or 0.5 (every other member), so that no two share a
config; `--values seeds`: K seeds of the default config. The ways:
- sequential: each member's own compiled step (`cnnjax train`'s, compiled for its config), one
  after another: what K `cnnjax train` runs cost on one machine, without their start-up;
- loop: `make_sweep_step('loop', ...)`, cnnjax sweep's default on CPU: the same steps inside the
  sweep's bookkeeping;
- vmap: `make_sweep_step('vmap', ...)`: one `jit(vmap(step))` over the stacked states, the grid's
  values (learning rate, dropout) as arrays beside them, so every member shares one program;
- unroll: `make_sweep_step('unroll', ...)`: the K members' steps written out in one program.
Reported as aggregate images/s (K x batch per step), its ratio to sequential, and the first
call's seconds (compile: sequential and loop compile one program per config).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from cnnjax import Config, DatasetSpec
from cnnjax.training.builder import build_members
from cnnjax.training.sweep import make_sweep_step

IMAGE_SHAPE, MEAN, STD = (28, 28, 1), 0.1307, 0.3081
SPEC = DatasetSpec("mnist", 10, IMAGE_SHAPE, MEAN, STD, ("train", "test"), False)
WAYS = ("sequential", "loop", "vmap", "unroll")


def member_configs(k: int, values: str) -> tuple[list[Config], tuple[str, ...]]:
    """The K members' configs and the grid keys they differ in."""
    if values == "seeds":
        return [Config().set("train.seed", i) for i in range(k)], ()
    keys = ("optim.learning_rate", "model.kwargs.dropout")
    return [Config().override([f"optim.learning_rate={1e-4 * 100 ** (i / max(1, k - 1)):.6g}",
                               f"model.kwargs.dropout={0.5 * (i % 2)}"]) for i in range(k)], keys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--values", choices=("grid", "seeds"), default="grid")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"a subset of {','.join(WAYS)}")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    k, bs, ways = args.members, args.batch_size, args.ways.split(",")
    cfgs, keys = member_configs(k, args.values)
    parts = build_members([c.set("train.batch_size", bs) for c in cfgs], SPEC, steps_per_epoch=1)
    rng = np.random.default_rng(0)
    batches = [[{"image": rng.integers(0, 256, (bs, *IMAGE_SHAPE), dtype=np.uint8),
                 "label": rng.integers(0, 10, bs).astype(np.int32),
                 "index": rng.permutation(60000)[:bs].astype(np.int32)} for _ in range(k)]
               for _ in range(args.steps + 1)]
    batches = [[jax.device_put(b) for b in step] for step in batches]  # on the device, as placed

    steps = {way: make_sweep_step(way, parts, keys) for way in ways if way != "sequential"}
    held = {way: step.pack([p.init_state() for p in parts]) for way, step in steps.items()}
    singles = [p.init_state() for p in parts] if "sequential" in ways else []

    def run_sequential(step_batches):
        for per_member in step_batches:
            for i, p in enumerate(parts):
                singles[i], _ = p.epoch_steps[0](singles[i], per_member[i], p.train_key)
        jax.block_until_ready(singles)

    def runner(way):
        def run(step_batches):
            for per_member in step_batches:
                held[way], _ = steps[way](held[way], per_member)
            jax.block_until_ready(held[way])
        return run

    runs = {way: run_sequential if way == "sequential" else runner(way) for way in ways}
    compile_s, rates = {}, {way: [] for way in ways}
    for way, run in runs.items():
        start = time.perf_counter()
        run(batches[:1])
        compile_s[way] = time.perf_counter() - start
    for repeat in range(args.repeats):
        for way in (ways if repeat % 2 == 0 else ways[::-1]):
            start = time.perf_counter()
            runs[way](batches[1:])
            rates[way].append(k * bs * args.steps / (time.perf_counter() - start))
    report = {"args": vars(args), "device": str(jax.devices()[0]), "compile_s": compile_s,
              "images_per_s": rates}
    print(f"{k} members ({args.values}), batch {bs} each, on {report['device']}; aggregate train "
          f"images/s, median (min–max) of {args.repeats} alternating repeats of {args.steps} "
          f"steps\n")
    print("| way | images/s | vs sequential | first call (s) |\n|---|---:|---:|---:|")
    base = statistics.median(rates["sequential"]) if "sequential" in rates else None
    for way, values in rates.items():
        med = statistics.median(values)
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {way} | {med:,.0f} ({min(values):,.0f}–{max(values):,.0f}) | {ratio} | "
              f"{compile_s[way]:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
