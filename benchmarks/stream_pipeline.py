"""The streaming pipeline alone: an image folder of JPEGs read, decoded and resized, in images/s
for each number of grain workers.

    python benchmarks/stream_pipeline.py [--images 6000] [--source 320x240] [--size 64]
                                         [--workers 0 1 2] [--batch-size 128] [--json out.json]

Writes --images JPEGs of --source pixels (quality 90, two classes) in a temporary folder, and
reads one epoch of training batches of --size x --size through `cnnjax.open_data` with
`data.stream=on` for each --workers count: every image read from its file, decoded by Pillow and
resized (antialiased bicubic), batched by grain, nothing trained. The first batch (workers
starting) is timed apart; the rate is over the rest of the epoch, median of --repeats epochs. The
statistics pass that a folder's first streamed use makes is done once, before. About 3 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

import cnnjax
from cnnjax.data import input_pipeline


def write_folder(root: pathlib.Path, n: int, width: int, height: int) -> int:
    """n JPEGs of smooth gradients under noise (so they compress like photographs); bytes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    for i in range(n):
        base = np.stack([xx * rng.uniform(100, 255), yy * rng.uniform(100, 255),
                         (xx + yy) * rng.uniform(50, 120)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        folder = root / ("a", "b")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.jpg"))


def epoch_rate(data, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the rest) of one epoch's batches."""
    t0 = time.perf_counter()
    batches = data.train_batches(batch_size, 0, 1)
    n = len(next(batches)["label"])
    first = time.perf_counter() - t0
    t1, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["label"])
    return first, n / (time.perf_counter() - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--source", default="320x240", help="WIDTHxHEIGHT of the JPEG files")
    parser.add_argument("--size", type=int, default=64, help="the side they are resized to")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    width, height = map(int, args.source.split("x"))

    work = pathlib.Path(tempfile.mkdtemp(prefix="cnnjax-pipeline-"))
    try:
        on_disk = write_folder(work / "images", args.images, width, height)
        base = [f"data.dataset=imagefolder:{work / 'images'}", f"data.data_dir={work / 'tfds'}",
                f"data.image_size={args.size}", "data.stream=on"]
        input_pipeline.open_data(cnnjax.Config().override(base).data, 0).close()  # statistics
        rows = []
        for workers in args.workers:
            cfg = cnnjax.Config().override(base + [f"data.workers={workers}"])
            firsts, rates = [], []
            for _ in range(args.repeats):
                data = input_pipeline.open_data(cfg.data, 0)
                try:
                    first, rate = epoch_rate(data, args.batch_size)
                finally:
                    data.close()
                firsts.append(first)
                rates.append(rate)
            rate = statistics.median(rates)
            rows.append({"workers": workers, "images_per_s": rate,
                         "per_worker": rate / max(workers, 1), "first_batch_s": min(firsts)})
            print(f"workers={workers}: {rate:,.0f} images/s, first batch {min(firsts):.1f} s",
                  flush=True)
        result = {"images": args.images, "source": [width, height], "size": args.size,
                  "on_disk_mb": on_disk / 1e6, "batch_size": args.batch_size, "rows": rows}
        print(f"\n{args.images} JPEGs of {width}x{height} ({on_disk / args.images / 1e3:.1f} kB "
              f"each) -> {args.size}x{args.size}\n\n| workers | images/s | per worker | "
              f"first batch |\n|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['workers']} | {r['images_per_s']:,.0f} | {r['per_worker']:,.0f} | "
                  f"{r['first_batch_s']:.1f} s |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
