"""Training throughput with the data streamed through grain against held in memory, on
CIFAR-10-shaped data.

    python benchmarks/stream_throughput.py [--images 50000] [--batch-size 128] [--rounds 3]
                                           [--workers 0 2] [--model seed_cnn] [--json out.json]

A CIFAR-10 binary archive of --images random 32x32x3 training images (and 10,000 test images) is
written here and prepared into array_record by cnnjax's cifar10 builder (loader.py's archive).
One run is set up per mode (`cnnjax.setup`: in memory, `data.stream=off`; streamed,
`data.stream=on` with each --workers count), each compiled once by a first, untimed epoch; then
--rounds rounds train one whole epoch of each mode in turn (`cnnjax.train_epoch`: the loop's
reading, the host-to-device copy and the step; no validation), so the modes share the machine's
state as alike as they can. Reported: each mode's images/s (median over rounds) and its ratio to
the in-memory rate of the same round (median). The target: streamed >= 0.9x in memory at batch
128. The default model is the seed CNN (32 and 64 filters, dense 128): the fastest of the
framework, so the strictest ratio. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import tempfile

import cnnjax
from loader import write_archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="cnnjax-throughput-"))
    runs = {}
    try:
        (work / "manual").mkdir()
        write_archive(work / "manual" / "cifar-10-binary.tar.gz", args.images, 10_000)
        base = ["data.dataset=cifar10", f"data.data_dir={work / 'tfds'}",
                f"data.manual_dir={work / 'manual'}", f"train.batch_size={args.batch_size}",
                f"train.epochs={args.rounds + 1}", "train.progress=false",
                f"model.name={args.model}", "train.early_stopping_patience=0"]
        modes = {"in memory": ["data.stream=off"]}
        modes.update({f"streamed, {w} workers": ["data.stream=on", f"data.workers={w}"]
                      for w in args.workers})
        hooks = cnnjax.CallbackList([])
        for name, extra in modes.items():
            run, state, loop = cnnjax.setup(cnnjax.Config().override(base + extra),
                                            work / name.replace(" ", "_").replace(",", ""))
            runs[name] = [run, state, cnnjax.start(run, state, loop, hooks)]

        def epoch(name: str) -> float:
            run, state, loop = runs[name]
            state, loop = cnnjax.train_epoch(run, state, loop, hooks)
            runs[name][1:] = [state, loop.replace(epoch=loop.epoch + 1, batch=0, epoch_steps=())]
            return loop.timing.epoch_rates[-1]

        for name in modes:  # compiles, starts the workers
            epoch(name)
        rates = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name in modes:
                rates[name].append(epoch(name))
        base_rates = rates["in memory"]
        rows = [{"mode": name, "images_per_s": statistics.median(r),
                 "ratio": statistics.median(x / b for x, b in zip(r, base_rates)),
                 "rounds": r} for name, r in rates.items()]
        print(f"\n{args.images} CIFAR-shaped images, {args.model}, batch {args.batch_size}\n\n"
              f"| data | images/s | vs in memory |\n|---|---:|---:|")
        for row in rows:
            print(f"| {row['mode']} | {row['images_per_s']:,.0f} | {row['ratio']:.2f}x |")
        if args.json:
            args.json.write_text(json.dumps({"images": args.images, "model": args.model,
                                             "batch_size": args.batch_size, "rows": rows},
                                            indent=1) + "\n")
    finally:
        for run, _, _ in runs.values():
            run.data.close()
            run.ckpt.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
