"""Accelerator benchmark: cnnjax's steps with batches resident on the device, K steps per dispatch.

    python benchmarks/device_bench.py --out DIR          # on the GPU (benchmarks/device.sh runs it)
    python benchmarks/device_bench.py --smoke --out DIR  # tiny sizes, any backend: checks the logic

What is measured, images per second, alternating frameworks in one process (which goes first swaps
each repeat), each sample the median of --dispatches timed dispatches:
- train: cnnjax's pure train step (`make_train_step(..., compiled=False)`: SeedCNN, the default
  optax chain, the non-finite guard, per-layer gradient norms) inside `lax.scan` over K batches
  already on the device, one jitted, state-donating dispatch per K steps; against the seed's
  torch loop body (Adam amsgrad, CrossEntropyLoss), eager, channels-last, on the same batches on
  the same device.
- eval: forward + argmax + correct count, scanned likewise; torch: model.eval() under no_grad.
- dtypes: f32, and bf16 compute with f32 parameters and optimizer state (cnnjax:
  `train.dtype=bfloat16`'s `StepOptions`, parameters and images cast inside the step; torch:
  autocast to bf16).
- sweep: 8 seeds (`--sweep-seeds`) trained by jit(vmap(scan(train_step))) over stacked states,
  against the 8 seeds' single-seed scanned steps one after another; aggregate images/s.
Writes DIR/device.json (every sample, versions, device) and DIR/device.md (the tables).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from throughput import MEAN, NUM_CLASSES, SPEC, STD, IMAGE_SHAPE, seed_torch_model  # noqa: E402

from cnnjax import Config, DatasetSpec, build  # noqa: E402
from cnnjax.data.pixels import normalize  # noqa: E402

DTYPES = {"f32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for device.json and device.md")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--steps-per-dispatch", type=int, default=20, help="K, scanned steps")
    parser.add_argument("--dispatches", type=int, default=3, help="timed dispatches per sample")
    parser.add_argument("--repeats", type=int, default=3, help="alternating samples")
    parser.add_argument("--sweep-seeds", type=int, default=8)
    parser.add_argument("--sweep-batch-size", type=int, default=128)
    parser.add_argument("--tests-log", help="a pytest log whose last line goes into the report")
    parser.add_argument("--smoke", action="store_true",
                        help="batch 8 and 16, 2 steps per dispatch, 1 repeat, 2 seeds: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.steps_per_dispatch, args.dispatches = [8, 16], 2, 1
        args.repeats, args.sweep_seeds, args.sweep_batch_size = 1, 2, 8
    for name in ("steps_per_dispatch", "dispatches", "repeats", "sweep_seeds", "sweep_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"got {getattr(args, name)}.")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}.")
    return args


def make_data(k: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """K batches of random uint8 pixels and labels (speed does not depend on the digits)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (k, batch, *IMAGE_SHAPE), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, (k, batch)).astype(np.int32))


def timed(fn, sync, dispatches: int) -> float:
    """Median seconds of one `fn()` dispatch, each synchronized."""
    times = []
    for _ in range(dispatches):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- cnnjax ---------------------------------------------------------------------------------------

class JaxSide:
    name = "cnnjax"

    def __init__(self, dtype: str):
        # what `cnnjax train` builds (train.dtype picks the compute dtype), its step pure
        self.parts = build(Config().set("train.dtype", dtype), SPEC, steps_per_epoch=1)
        self.model, self.options = self.parts.model, self.parts.options
        self.step = self.parts.pure_train_step()
        self.train_scan = jax.jit(self._train_scan, donate_argnums=0)
        self.eval_scan = jax.jit(self._eval_scan)
        self.sweep_scan = jax.jit(jax.vmap(self._train_scan), donate_argnums=0)
        self.rng = jax.random.key(1)

    def state(self, seed: int = 0):
        return self.parts.init_state(jax.random.key(seed))

    def _train_scan(self, state, images, labels):
        index = jnp.arange(images.shape[1], dtype=jnp.int32)

        def body(state, xs):
            state, metrics = self.step(state, {"image": xs[0], "label": xs[1], "index": index},
                                       self.rng)
            return state, metrics["loss"]

        return lax.scan(body, state, (images, labels))

    def _eval_scan(self, state, images, labels):
        cast = self.options.cast

        def body(correct, xs):
            logits = self.model.apply(cast({"params": state.params}),
                                      cast(normalize(xs[0].astype(jnp.float32), MEAN, STD)))
            return correct + jnp.sum(jnp.argmax(logits, -1) == xs[1]), None

        return lax.scan(body, jnp.zeros([], jnp.int32), (images, labels))[0]


# --- torch ----------------------------------------------------------------------------------------

class TorchSide:
    name = "torch"

    def __init__(self, dtype):
        torch.manual_seed(0)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = seed_torch_model().to(self.device, memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-5,
                                    amsgrad=True)
        self.loss = torch.nn.CrossEntropyLoss()
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=dtype,
                                          enabled=dtype != torch.float32)

    def sync(self, _=None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def put(self, images: np.ndarray, labels: np.ndarray):
        x = torch.from_numpy(images).to(self.device).permute(0, 1, 4, 2, 3)  # (K, B, C, H, W)
        return x, torch.from_numpy(labels).to(self.device).long()

    def _inputs(self, x):
        x = (x.float() / 255.0 - MEAN) / STD
        return x.contiguous(memory_format=torch.channels_last)

    def train(self, data) -> None:
        self.model.train()
        for x, y in zip(*data):
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss(self.model(self._inputs(x)), y)
            loss.backward()
            self.opt.step()

    def evaluate(self, data):
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        with torch.no_grad(), self.autocast():
            for x, y in zip(*data):
                correct += (self.model(self._inputs(x)).argmax(1) == y).sum()
        return correct


# --- the runs -------------------------------------------------------------------------------------

def bench_steps(args, dtype_name: str) -> list[dict]:
    jdtype, tdtype = DTYPES[dtype_name]
    ours, theirs = JaxSide(jdtype), TorchSide(tdtype)
    k, rows = args.steps_per_dispatch, []
    for bs in args.batch_sizes:
        images, labels = make_data(k, bs, bs)
        dev = jax.device_put((images, labels))
        tdata = theirs.put(images, labels)
        holder = {"state": ours.state()}

        def jax_train():
            holder["state"], losses = ours.train_scan(holder["state"], *dev)
            return losses

        runs = {
            ("train", "cnnjax"): (jax_train, jax.block_until_ready),
            ("eval", "cnnjax"): (lambda: ours.eval_scan(holder["state"], *dev),
                                 jax.block_until_ready),
            ("train", "torch"): (lambda: theirs.train(tdata), theirs.sync),
            ("eval", "torch"): (lambda: theirs.evaluate(tdata), theirs.sync),
        }
        first = {}
        for key, (fn, sync) in runs.items():  # compile (and torch's warm-up), timed apart
            start = time.perf_counter()
            sync(fn())
            first[key] = time.perf_counter() - start
        samples = {key: [] for key in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
            for key in order:
                fn, sync = runs[key]
                samples[key].append(k * bs / timed(fn, sync, args.dispatches))
        for (phase, framework), values in samples.items():
            rows.append({"dtype": dtype_name, "batch_size": bs, "phase": phase,
                         "framework": framework, "images_per_s": values,
                         "median": statistics.median(values),
                         "first_call_s": first[(phase, framework)]})
        print(f"{dtype_name} batch {bs} done", file=sys.stderr, flush=True)
    return rows


def bench_sweep(args) -> dict:
    """N seeds: one vmapped scanned dispatch against N single-seed scanned dispatches."""
    side, n, bs = JaxSide("float32"), args.sweep_seeds, args.sweep_batch_size
    k = args.steps_per_dispatch
    data = [make_data(k, bs, 100 + s) for s in range(n)]
    seq_data = [jax.device_put(d) for d in data]
    vmap_data = jax.device_put(tuple(np.stack([d[i] for d in data]) for i in range(2)))
    holder = {"seq": [side.state(s) for s in range(n)],
              "vmap": jax.tree.map(lambda *xs: jnp.stack(xs), *[side.state(s) for s in range(n)])}

    def sequential():
        losses = []
        for i in range(n):
            holder["seq"][i], loss = side.train_scan(holder["seq"][i], *seq_data[i])
            losses.append(loss)
        return losses

    def vmapped():
        holder["vmap"], losses = side.sweep_scan(holder["vmap"], *vmap_data)
        return losses

    runs = {"sequential": sequential, "vmap": vmapped}
    first = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = time.perf_counter() - start
    samples = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name in (runs if repeat % 2 == 0 else list(runs)[::-1]):
            samples[name].append(n * k * bs / timed(runs[name], jax.block_until_ready,
                                                      args.dispatches))
    return {"seeds": n, "batch_size": bs, "steps_per_dispatch": k,
            **{name: {"images_per_s": v, "median": statistics.median(v),
                      "first_call_s": first[name]} for name, v in samples.items()}}


def environment() -> dict:
    return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_device": str(jax.devices()[0]), "torch": torch.__version__,
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "python": platform.python_version(), "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    rows = {(r["dtype"], r["batch_size"], r["phase"], r["framework"]): r for r in report["steps"]}
    lines = [f"JAX {env['jax']} on {env['jax_device']}; torch {env['torch']} on "
             f"{env['torch_device']} (eager, channels-last). {args['steps_per_dispatch']} steps "
             f"per dispatch (lax.scan; torch: a Python loop over the same device-resident "
             f"batches), median of {args['repeats']} alternating samples of "
             f"{args['dispatches']} dispatches; images/s.", "",
             "| dtype | batch | cnnjax train | torch train | train ratio | cnnjax eval | "
             "torch eval | eval ratio | cnnjax first call train / eval (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for dtype in args["dtypes"]:
        for bs in args["batch_sizes"]:
            get = lambda phase, fw: rows[(dtype, bs, phase, fw)]
            cells = []
            for phase in ("train", "eval"):
                ours, theirs = get(phase, "cnnjax")["median"], get(phase, "torch")["median"]
                cells += [f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}x"]
            lines.append(f"| {dtype} | {bs} | " + " | ".join(cells) + f" | "
                         f"{get('train', 'cnnjax')['first_call_s']:.1f} / "
                         f"{get('eval', 'cnnjax')['first_call_s']:.1f} |")
    sweep = report["sweep"]
    lines += ["", f"Sweep, {sweep['seeds']} seeds at batch {sweep['batch_size']} (f32), aggregate "
              f"images/s: vmap {sweep['vmap']['median']:,.0f}, sequential "
              f"{sweep['sequential']['median']:,.0f}: "
              f"{sweep['vmap']['median'] / sweep['sequential']['median']:.2f}x "
              f"(first call {sweep['vmap']['first_call_s']:.1f} s / "
              f"{sweep['sequential']['first_call_s']:.1f} s)."]
    if report.get("tests"):
        lines += ["", f"Tests on this device: {report['tests']}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"args": vars(args), "environment": environment(), "steps": []}
    for dtype in args.dtypes:
        report["steps"] += bench_steps(args, dtype)
    report["sweep"] = bench_sweep(args)
    if args.tests_log and pathlib.Path(args.tests_log).exists():
        lines = pathlib.Path(args.tests_log).read_text().strip().splitlines()
        report["tests"] = lines[-1] if lines else "no output"
    report["wall_time_s"] = time.perf_counter() - start
    (out / "device.json").write_text(json.dumps(report, indent=2))
    (out / "device.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
