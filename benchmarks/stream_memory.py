"""A dataset three times larger than the memory cap, trained one epoch streamed: peak memory and
images/s.

    python benchmarks/stream_memory.py [--images 244141] [--cap-gb 1] [--workers 0 2] [--dir DIR]
                                       [--keep] [--json out.json]

Writes an image folder of --images 64x64 colour JPEGs (244,141 of them decode to 3.0 GB: three
times the 1 GB cap) in two classes under --dir (default: a temporary directory), then trains one
epoch on it with `cnnjax train --set data.max_memory_gb=<cap>`, which streams it ('auto': the
decoded pixels exceed the cap) through grain, once for each --workers count (the statistics pass
is made once, with the most workers). Each trainer runs in its own process; its peak resident memory is the kernel's high-water mark (VmHWM), and the
workers' resident and proportional (PSS: shared pages split among the processes that map them)
memory is sampled every 0.2 s. Reported: the folder's decoded size, the one-time pass that
computes its statistics (timed here, in this process, before the trainer starts), the trainer's
peak RSS against the cap, the workers' peaks, the whole run's peak PSS, training images/s
(timing.jsonl) and the epoch's wall time. Everything written is deleted at the end (--keep keeps
it). About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

SIZE = 64
CLASSES = ("circles", "squares")


def write_folder(root: pathlib.Path, n: int) -> float:
    """n JPEGs (quality 90) of a bright shape on noise, half of each class, 1,000 per subfolder;
    returns the seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 160, (SIZE, SIZE, 3), dtype=np.uint8)
        cy, cx, r = rng.integers(16, 48, 2).tolist() + [int(rng.integers(6, 14))]
        inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if label == 0 else \
            ((abs(yy - cy) < r) & (abs(xx - cx) < r))
        pixels[inside] = 255
        folder = root / CLASSES[label] / f"{i // 2000:04d}"
        if i % 2000 < 2:
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:07d}.jpg", quality=90)
    return time.perf_counter() - t0


def memory(pid: int) -> tuple[int, int, int]:
    """(VmHWM, VmRSS, Pss) of a process, in bytes; zeros once it is gone."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        rollup = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0, 0
    field = lambda text, name: int(next(l.split()[1] for l in text.splitlines()
                                        if l.startswith(name + ":"))) * 1024
    return field(status, "VmHWM"), field(status, "VmRSS"), field(rollup, "Pss")


def children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def train(settings: list[str], run_dir: pathlib.Path) -> dict:
    """One `cnnjax train` in its own process, its memory sampled every 0.2 s."""
    cmd = [sys.executable, "-m", "cnnjax", "train", "--quiet", "--run-dir", str(run_dir)]
    for item in settings:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"trainer_rss": 0, "workers_rss": 0, "total_pss": 0, "children": 0}
    while proc.poll() is None:
        trainer = memory(proc.pid)
        kids = [memory(c) for c in children(proc.pid)]
        peak["trainer_rss"] = max(peak["trainer_rss"], trainer[0])
        peak["workers_rss"] = max(peak["workers_rss"], sum(k[1] for k in kids))
        peak["total_pss"] = max(peak["total_pss"], trainer[2] + sum(k[2] for k in kids))
        peak["children"] = max(peak["children"], len(kids))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"cnnjax train failed ({proc.returncode})")
    timing = [json.loads(l) for l in (run_dir / "timing.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"trainer_peak_rss_gb": peak["trainer_rss"] / 1e9,
            "workers_peak_rss_gb": peak["workers_rss"] / 1e9,
            "run_peak_pss_gb": peak["total_pss"] / 1e9, "child_processes": peak["children"],
            "train_images_per_s": timing[-1]["train_images_per_s"],
            "epoch_s": timing[-1]["seconds"], "train_s": timing[-1]["train_seconds"],
            "run_wall_s": time.perf_counter() - t0, "streamed": summary["data"]["streamed"],
            "test_accuracy": summary["test"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=244_141)
    parser.add_argument("--cap-gb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dir", type=pathlib.Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="cnnjax-stream-", dir=args.dir))
    folder, data_dir = work / "images", work / "tfds"
    try:
        build_s = write_folder(folder, args.images)
        on_disk = sum(p.stat().st_size for p in folder.rglob("*.jpg"))
        settings = [f"data.dataset=imagefolder:{folder}", f"data.data_dir={data_dir}",
                    f"data.max_memory_gb={args.cap_gb}", "model.kwargs.features=8,16",
                    "model.kwargs.dense=32", "train.epochs=1",
                    f"train.batch_size={args.batch_size}", "train.eval_batch_size=256"]

        import cnnjax  # the statistics pass, in this process: the trainers find it cached
        from cnnjax.data import input_pipeline

        cfg = cnnjax.Config().override(settings + [f"data.workers={max(args.workers)}"])
        decoded = input_pipeline.decoded_bytes(cfg.data)
        assert input_pipeline.streams(cfg.data), "the folder fits the cap: nothing to measure"
        t0 = time.perf_counter()
        input_pipeline.open_data(cfg.data, seed=0).close()
        scan_s = time.perf_counter() - t0

        result = {"images": args.images, "image_size": [SIZE, SIZE, 3],
                  "on_disk_gb": on_disk / 1e9, "decoded_gb": decoded / 1e9, "cap_gb": args.cap_gb,
                  "batch_size": args.batch_size, "build_s": build_s,
                  "statistics_pass_s": scan_s, "statistics_pass_workers": max(args.workers),
                  "runs": {}}
        for workers in args.workers:
            result["runs"][workers] = train(settings + [f"data.workers={workers}"],
                                            work / f"run-{workers}")
            print(json.dumps(result["runs"][workers]), flush=True)
        print(f"\n{args.images:,} JPEGs of {SIZE}x{SIZE}x3: {result['decoded_gb']:.2f} GB decoded "
              f"({result['on_disk_gb']:.2f} GB on disk), cap {args.cap_gb:g} GB; statistics "
              f"pass {scan_s:.0f} s\n\n| workers | trainer peak RSS | workers' peak RSS | "
              f"run's peak PSS | train images/s | epoch |\n|---:|---:|---:|---:|---:|---:|")
        for workers, r in result["runs"].items():
            print(f"| {workers} | {r['trainer_peak_rss_gb']:.2f} GB | "
                  f"{r['workers_peak_rss_gb']:.2f} GB | {r['run_peak_pss_gb']:.2f} GB | "
                  f"{r['train_images_per_s']:,.0f} | {r['epoch_s']:.0f} s |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
