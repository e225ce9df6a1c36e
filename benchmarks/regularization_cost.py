"""What regularization costs per train step: augmentation, dropout and batch norm against the baseline.

    python benchmarks/regularization_cost.py [--batch-size 64] [--steps 40] [--repeats 5]

Each variant's jitted step runs `--steps` steps per repeat on device-resident uint8 batches; variants
alternate within each repeat (this machine is noisy), and the table gives median milliseconds per
step and the overhead against the baseline. The target for augmentation is at most 15%.
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np

import cnnjax
from cnnjax.config import Config

SPEC = cnnjax.DatasetSpec("mnist", 10, (28, 28, 1), 0.1307, 0.3081, ("train", "test"), False)

VARIANTS = {
    "baseline": [],
    "augment": ["augment.rotate=10", "augment.translate=2", "augment.scale=0.1"],
    "dropout": ["model.kwargs.dropout=0.5"],
    "batch_norm": ["model.kwargs.batch_norm=true"],
}


def build(overrides, batch_size):
    parts = cnnjax.build(Config().override(overrides), SPEC, steps_per_epoch=1)
    state, step = parts.init_state(jax.random.key(0)), parts.epoch_steps[0]
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
                            "label": rng.integers(0, 10, batch_size).astype(np.int32),
                            "index": np.arange(batch_size, dtype=np.int32)})
    key = jax.random.key(1)
    state, _ = step(state, batch, key)  # compile
    jax.block_until_ready(state)
    return [state, step, batch, key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    built = {name: build(o, args.batch_size) for name, o in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, b in built.items():
            state, step, batch, key = b
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, batch, key)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            b[0] = state
    base = statistics.median(times["baseline"])
    rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                   "overhead": statistics.median(t) / base - 1} for name, t in times.items()}
    print(f"batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, {jax.devices()[0].platform}")
    print("| variant | median ms/step | min–max | overhead vs baseline |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f}–{r['max_ms']:.2f} | {r['overhead']:+.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch_size": args.batch_size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
