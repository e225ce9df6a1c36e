"""Train-step time against device count, on simulated CPU devices (or the real ones you have).

    python benchmarks/scaling.py [--devices 1 2 4 8] [--batch-size 128] [--steps 20]

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N must
be set before JAX starts), with the global batch split across the devices as `cnnjax train` does.
On a CPU the simulated devices share the same physical cores, so this measures what partitioning
and the all-reduce cost, not a speed-up; docs/scaling.md says what to expect on accelerators.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import jax, numpy as np
import cnnjax
from cnnjax.training.parallel import DataParallel
batch_size, steps, repeats = map(int, sys.argv[1:4])
par = DataParallel.create()
spec = cnnjax.DatasetSpec("mnist", 10, (28, 28, 1), 0.1307, 0.3081, ("train", "test"), False)
cfg = cnnjax.Config().set("train.batch_size", batch_size)
parts = cnnjax.build(cfg, spec, 1, devices=par.num_devices, sharding=par.replicated)
state, step = parts.init_state(jax.random.key(0)), parts.epoch_steps[0]
rng = np.random.default_rng(0)
batch = par.shard_batch({"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
                         "label": rng.integers(0, 10, batch_size).astype(np.int32),
                         "index": np.arange(batch_size, dtype=np.int32)})
key = jax.random.key(1)
t0 = time.perf_counter(); state, _ = step(state, batch, key); jax.block_until_ready(state)
compile_s = time.perf_counter() - t0
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, batch, key)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / steps)
print(json.dumps({"devices": par.num_devices, "platform": jax.devices()[0].platform,
                  "step_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                  "max_ms": 1e3 * max(times), "compile_s": compile_s,
                  "images_per_s": batch_size / statistics.median(times)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for n in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch_size), str(args.steps),
                              str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"global batch {args.batch_size}, {os.cpu_count()} physical CPU cores\n")
    print("| devices | median ms/step | min–max | images/s | compile s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} ({r['platform']}) | {r['step_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} "
              f"| {r['images_per_s']:.0f} | {r['compile_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
