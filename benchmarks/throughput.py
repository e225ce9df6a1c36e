"""Training and evaluation throughput: cnnjax's compiled steps against the seed's PyTorch program.

    python benchmarks/throughput.py                      # about 2-3 minutes on 2 quiet CPU cores
    python benchmarks/throughput.py --batch-sizes 64 --repeats 5 --steps 50 --json out.json
    python benchmarks/throughput.py --max-seconds 0      # always --steps steps (slow on CPU)
    python benchmarks/throughput.py --conv-lowering xla auto winograd/xla/patches,winograd/xla/xla

Both frameworks run in this one process on the same machine, alternating (which goes first swaps
each repeat), because this machine is noisy: compare the medians and the ratio, not one number.
With several --conv-lowering specs (`model.kwargs.conv_lowering`, cnnjax/nn/conv.py) each is its own
cnnjax runner in the same alternation, so lowerings are compared with each other and with torch
in one run.
Each measurement is one untimed, synchronized warm-up step, then up to --steps timed steps: fewer
(but at least 3) where the warm-up step says --steps would take longer than --max-seconds, which
keeps batch 512 on a 2-core CPU (about 1 s a step) within the 2-3 minute budget. The JSON records
how many steps each sample timed.

What is measured, per batch size, in images per second:
- train: cnnjax's `make_train_step` (SeedCNN, `make_optimizer`'s optax chain, state donated,
  uint8 pixels normalized inside the step, on CPU in passes of at most 64 images: `grad_passes`) against the seed's torch loop body (the same network
  and init: conv N(0, 0.01), linear Xavier-uniform, biases 0; Adam(lr=1e-3, weight_decay=1e-5,
  amsgrad=True); CrossEntropyLoss; model.train()), fed the same uint8 batches and normalizing them
  as tensor ops (the seed's per-image DataLoader transforms are not part of either number).
  cnnjax's first call (trace + compile + one step) is timed apart and reported, never averaged in.
- eval: cnnjax's `make_eval_step` (forward, loss sum, correct count, confusion matrix; on CPU in
  passes of at most 256 images) against torch's model.eval() forward + argmax under no_grad().
- pipeline: `cnnjax.data.input_pipeline.train_batches` over 4,000 in-memory uint8 images (host only).
- host share: the median time of cnnjax's first 3 timed step calls (argument handling,
  host-to-device copy of the batch, dispatch of the step's executions) over the step's time; the
  rest is the device (here: XLA:CPU's threads) computing. Later calls are not counted: once about
  30 executions are queued the runtime makes the next call wait for the device.

Threads: torch keeps its default intra-op thread count (all cores) unless --torch-threads says
otherwise; XLA:CPU likewise uses all cores. torch's OpenMP threads slow down sharply when other
processes load the same cores (measured here at a load average of 4-6 on 2 cores: training 2-7x
slower with the default 2 threads than with 1), so the header reports the load average; on a
shared machine, read the torch numbers with it, or compare with --torch-threads 1.
Devices: JAX uses its default device, torch uses CUDA when available; so the script runs unchanged
on a GPU machine. Timed loops end with a device sync (block_until_ready / cuda.synchronize).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import torch
from torch import nn

from cnnjax import Config, DatasetSpec, build
from cnnjax.data.input_pipeline import train_batches
from cnnjax.nn.conv import conv_lowerings

MEAN, STD = 0.1307, 0.3081
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
SPEC = DatasetSpec("mnist", NUM_CLASSES, IMAGE_SHAPE, MEAN, STD, ("train", "test"), False)
POOL_SIZE = 4_000  # in-memory images the batches are drawn from
HOST_SHARE_CALLS = 3
WARMUP_STEPS = 1  # untimed (but synchronized, so it calibrates the step count) before each loop
MIN_TIMED_STEPS = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per measurement")
    parser.add_argument("--steps", type=int, default=30,
                        help="timed steps per measurement, at most")
    parser.add_argument("--max-seconds", type=float, default=3.0,
                        help="seconds one measurement may take, estimated from its warm-up "
                             f"step (at least {MIN_TIMED_STEPS} steps run); 0: no limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every sample and the summary to this file")
    parser.add_argument("--torch-threads", type=int,
                        help="torch intra-op threads; default: torch's own default (all cores)")
    parser.add_argument("--conv-lowering", nargs="+", default=["auto"],
                        help="model.kwargs.conv_lowering specs, one cnnjax runner each")
    args = parser.parse_args(argv)
    for name in ("repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if any(b < 1 or b > POOL_SIZE for b in args.batch_sizes):
        parser.error(f"--batch-sizes must lie in 1..{POOL_SIZE}, got {args.batch_sizes}.")
    return args


# --- data -----------------------------------------------------------------------------------------

def make_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real-shaped data: random uint8 pixels and labels (speed does not depend on the digits)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (POOL_SIZE, *IMAGE_SHAPE), dtype=np.uint8)
    return images, rng.integers(0, NUM_CLASSES, POOL_SIZE).astype(np.int32)


def take_batches(pool, batch_size: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` batches from cnnjax's own pipeline, epoch after epoch, materialized before timing."""
    batches, epoch = [], 0
    while len(batches) < count:
        batches.extend(train_batches(*pool, batch_size, seed, epoch))
        epoch += 1
    return batches[:count]


def time_pipeline(pool, batch_size: int, seed: int, min_seconds: float = 0.25) -> float:
    """Images per second of `train_batches` (shuffle + gather), whole epochs until `min_seconds`."""
    images, epoch = 0, 0
    start = time.perf_counter()
    while True:
        for batch in train_batches(*pool, batch_size, seed, epoch):
            images += len(batch["label"])
        epoch += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed


# --- timing ---------------------------------------------------------------------------------------

def measure(step, sync, batches, max_steps: int, max_seconds: float) -> tuple[float, int]:
    """Images per second of `step` over `batches`, and the number of timed steps.

    A synchronized warm-up step, which also estimates the step time, then the timed loop,
    synchronized once at its end."""
    start = time.perf_counter()
    for batch in batches[:WARMUP_STEPS]:
        step(batch)
    sync()
    step_s = (time.perf_counter() - start) / WARMUP_STEPS
    count = max_steps
    if max_seconds > 0:
        count = min(max_steps, max(MIN_TIMED_STEPS, math.ceil(max_seconds / step_s)))
    timed = batches[WARMUP_STEPS:WARMUP_STEPS + count]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    sync()
    return sum(len(b["label"]) for b in timed) / (time.perf_counter() - start), len(timed)


# --- cnnjax ---------------------------------------------------------------------------------------

class JaxRunner:
    """cnnjax's train step and a jitted forward + argmax; one train state across batch sizes."""

    def __init__(self, seed: int, lowering: str = "auto", name: str = "cnnjax"):
        self.name = name
        # what `cnnjax train` builds for the default config (the seed CNN, torch's Adam/AMSGrad)
        parts = build(Config().set("model.kwargs.conv_lowering", lowering), SPEC, steps_per_epoch=1)
        self.model = parts.model
        self.state = parts.init_state(jax.random.key(seed))
        self.train_step, self.eval_step = parts.epoch_steps[0], parts.eval_step
        self.rng = jax.random.key(seed + 1)
        self.compile_s: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
        self.host_share: list[float] = []

    def compile(self, batch) -> None:
        """First calls at this batch shape: trace + compile + one run each, timed apart."""
        bs = len(batch["label"])
        start = time.perf_counter()
        self.state, metrics = self.train_step(self.state, batch, self.rng)
        jax.block_until_ready((self.state, metrics))
        self.compile_s["train"][bs] = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(self.eval_step(self.state, with_mask(batch)))
        self.compile_s["eval"][bs] = time.perf_counter() - start

    def train(self, batches, max_steps: int, max_seconds: float) -> tuple[float, int]:
        calls = []

        def step(batch):
            start = time.perf_counter()
            self.state, _ = self.train_step(self.state, batch, self.rng)
            calls.append(time.perf_counter() - start)

        # Dispatch is asynchronous: the loop only queues steps; blocking on the state (a host-device
        # sync) waits for all of them, as each step reads the previous one's state.
        rate, count = measure(step, lambda: jax.block_until_ready(self.state), batches, max_steps,
                              max_seconds)
        # Host overhead: the time a step call takes (argument checks, host-to-device copy of the
        # batch, dispatch of its executions) over the step's time. Only the first timed calls count:
        # once about 30 executions are queued, XLA:CPU makes the next call wait for the device,
        # which is the device's time, not the host's.
        step_s = sum(len(b["label"]) for b in batches[WARMUP_STEPS:WARMUP_STEPS + count]) / rate / count
        first = calls[WARMUP_STEPS:WARMUP_STEPS + HOST_SHARE_CALLS]
        self.host_share.append(statistics.median(first) / step_s)
        return rate, count

    def evaluate(self, batches, max_steps: int, max_seconds: float) -> tuple[float, int]:
        masked, outputs = [with_mask(b) for b in batches], []
        step = lambda batch: outputs.append(self.eval_step(self.state, batch))
        return measure(step, lambda: jax.block_until_ready(outputs), masked, max_steps,
                       max_seconds)


def with_mask(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An eval batch: every row counts."""
    return {**batch, "mask": np.ones(len(batch["label"]), bool)}


# --- the seed's PyTorch program -------------------------------------------------------------------

def seed_torch_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


class TorchRunner:
    """The seed program's model, optimizer and loss: its training loop body, minus DataLoader."""

    name = "torch"

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = seed_torch_model().to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-5,
                                    amsgrad=True)
        self.loss = nn.CrossEntropyLoss()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _inputs(self, batch):
        x = torch.from_numpy(batch["image"]).to(self.device, non_blocking=True)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD  # ToTensor + Normalize, batched
        return x, torch.from_numpy(batch["label"]).to(self.device, non_blocking=True).long()

    def _train_step(self, batch) -> None:
        x, y = self._inputs(batch)
        self.opt.zero_grad()
        self.loss(self.model(x), y).backward()
        self.opt.step()

    def train(self, batches, max_steps: int, max_seconds: float) -> tuple[float, int]:
        self.model.train()
        return measure(self._train_step, self._sync, batches, max_steps, max_seconds)

    def evaluate(self, batches, max_steps: int, max_seconds: float) -> tuple[float, int]:
        self.model.eval()
        try:
            with torch.no_grad():
                predict = lambda batch: self.model(self._inputs(batch)[0]).argmax(1)
                return measure(predict, self._sync, batches, max_steps, max_seconds)
        finally:
            self.model.train()


# --- the run and its report -----------------------------------------------------------------------

def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def environment(torch_runner: TorchRunner, load_at_start: float) -> dict[str, str | int | float]:
    return {
        "jax_device": str(jax.devices()[0]), "jax_backend": jax.default_backend(),
        "torch_device": str(torch_runner.device), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1min": load_at_start,
        "python": platform.python_version(),
        "jax": jax.__version__, "torch": torch.__version__, "platform": platform.platform(),
    }


def run(args: argparse.Namespace) -> dict:
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pool = make_pool(args.seed)
    jax_runners = [JaxRunner(args.seed, spec, jax_name(args, spec)) for spec in args.conv_lowering]
    runners = [*jax_runners, TorchRunner(args.seed)]
    batches = {bs: take_batches(pool, bs, WARMUP_STEPS + args.steps, args.seed)
               for bs in args.batch_sizes}
    for bs in args.batch_sizes:
        for runner in jax_runners:
            runner.compile(batches[bs][0])

    samples = {(phase, runner.name, bs): [] for phase in ("train", "eval") for runner in runners
               for bs in args.batch_sizes}
    pipeline = {bs: [] for bs in args.batch_sizes}
    host = {bs: [] for bs in args.batch_sizes}
    steps = {key: [] for key in samples}
    limits = (args.steps, args.max_seconds)
    for repeat in range(args.repeats):
        order = runners if repeat % 2 == 0 else runners[::-1]
        for bs in args.batch_sizes:
            for phase in ("train", "eval"):
                for runner in order:
                    measure_phase = runner.train if phase == "train" else runner.evaluate
                    rate, count = measure_phase(batches[bs], *limits)
                    samples[(phase, runner.name, bs)].append(rate)
                    steps[(phase, runner.name, bs)].append(count)
                    if phase == "train" and runner is jax_runners[0]:
                        host[bs].append(runner.host_share[-1])
            pipeline[bs].append(time_pipeline(pool, bs, args.seed))
        print(f"repeat {repeat + 1}/{args.repeats} done after {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)

    results = []
    for (phase, name, bs), values in samples.items():
        results.append({"phase": phase, "framework": name, "batch_size": bs, "images_per_s": values,
                        "timed_steps": steps[(phase, name, bs)], **summarize(values)})
    return {
        "args": vars(args), "environment": environment(runners[-1], load_at_start),
        "compile_s": {runner.name: {phase: {str(bs): s for bs, s in by_bs.items()}
                                    for phase, by_bs in runner.compile_s.items()}
                      for runner in jax_runners},
        "conv_lowerings": {runner.name: conv_lowerings(runner.model, IMAGE_SHAPE,
                                                       min(args.batch_sizes))
                           for runner in jax_runners},
        "results": results,
        "pipeline": [{"batch_size": bs, "images_per_s": v, **summarize(v)}
                     for bs, v in pipeline.items()],
        "host_share": [{"batch_size": bs, "share": v, **summarize(v)} for bs, v in host.items()],
    }


def jax_name(args: argparse.Namespace, spec: str) -> str:
    return "cnnjax" if len(args.conv_lowering) == 1 else f"cnnjax[{spec}]"


def markdown(report: dict) -> str:
    env = report["environment"]
    by_key = {(r["phase"], r["framework"], r["batch_size"]): r for r in report["results"]}
    fmt = lambda r: f"{r['median']:,.0f} ({r['min']:,.0f}–{r['max']:,.0f})"
    lines = [
        f"JAX {env['jax']} on {env['jax_device']}; torch {env['torch']} on {env['torch_device']} "
        f"with {env['torch_threads']} threads "
        f"({'set by --torch-threads' if report['args']['torch_threads'] else 'its default'}; "
        f"{env['cpu_count']} CPUs; 1-minute load average {env['load_average_1min']:.1f} at the "
        f"start, {report['load_average_1min_end']:.1f} at the end). "
        f"{report['args']['repeats']} alternating repeats of up to {report['args']['steps']} timed "
        f"steps (fewest: {min(min(r['timed_steps']) for r in report['results'])}; "
        f"--max-seconds {report['args']['max_seconds']:g}); images/s, median (min–max).",
        "",
    ]
    names = list(report["compile_s"])
    ratio = lambda name: "cnnjax/torch" if name == "cnnjax" else f"{name}/torch"
    lines += ["| batch | phase | " + " | ".join(names) + " | torch | "
              + " | ".join(ratio(n) for n in names) + " | first call (s) |",
              "|---:|---|" + "---:|" * (2 * len(names) + 2)]
    for bs in report["args"]["batch_sizes"]:
        for phase in ("train", "eval"):
            theirs = by_key[(phase, "torch", bs)]
            ours = [by_key[(phase, name, bs)] for name in names]
            first = " / ".join(f"{report['compile_s'][n][phase][str(bs)]:.2f}" for n in names)
            lines.append(f"| {bs} | {phase} | " + " | ".join(fmt(o) for o in ours)
                         + f" | {fmt(theirs)} | "
                         + " | ".join(f"{o['median'] / theirs['median']:.2f}x" for o in ours)
                         + f" | {first} |")
    lines += ["", "first call = cnnjax's trace + compile + one step, excluded from the rates.", "",
              f"Conv lowerings (forward / input gradient / kernel gradient / inference, at "
              f"{min(report['args']['batch_sizes'])} rows): " + "; ".join(
                  f"{name}: " + ", ".join(f"{layer} {'/'.join(passes.values())}"
                                          for layer, passes in layers.items())
                  for name, layers in report["conv_lowerings"].items()) + ".", "",
              "| batch | input pipeline (train_batches, 4,000 uint8 images), images/s | "
              "pipeline / cnnjax train | cnnjax host share of train step time |",
              "|---:|---:|---:|---:|"]
    for p, h in zip(report["pipeline"], report["host_share"]):
        train = by_key[("train", names[0], p["batch_size"])]["median"]
        lines.append(f"| {p['batch_size']} | {fmt(p)} | {p['median'] / train:,.0f}x | "
                     f"{h['median']:.1%} ({h['min']:.1%}–{h['max']:.1%}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    report = run(args)
    report["wall_time_s"] = time.perf_counter() - start
    report["load_average_1min_end"] = os.getloadavg()[0]  # other processes skew both frameworks
    print(markdown(report))
    print(f"\nwall time {report['wall_time_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
