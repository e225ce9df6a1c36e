"""Does the input pipeline keep up with training on 32x32x3 images? Loader rate against step rate.

    python benchmarks/loader.py [--images 50000] [--batch-size 128] [--json out.json]

About a minute on 2 CPU cores. Measured, in images per second, on CIFAR-sized uint8 images:
- prepare / read: a CIFAR-10 binary archive of --images training images (written here, random
  pixels) prepared into array_record by cnnjax's builder, then read back whole through
  `tfds.data_source` (`cnnjax.load_split`); both happen once per run, so they are reported in
  seconds, not compared with the step.
- loader: what the training loop does for each step before the step itself: `train_batches` (the
  epoch's permutation, a gather of the batch's rows) and the batch's copy to the device
  (`jax.device_put`, synchronized), over one whole epoch.
- train: `make_train_step` of the seed CNN (conv 32 -> pool -> conv 64 -> pool -> dense 128) sized
  for 32x32x3 input — the fastest model of the framework, so the strictest ratio — and of
  ResNet-18 with the small stem (full width), each the median over several timed steps after one
  compiled warm-up step.
The target (issue "Data beyond MNIST"): loader >= 10x the training rate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import statistics
import tarfile
import tempfile
import time
import warnings

import jax
import numpy as np

import cnnjax
from cnnjax.config import DataConfig
from cnnjax.data import cifar, store

SHAPE = (32, 32, 3)


def write_archive(path: pathlib.Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)

    def records(n):
        rows = rng.integers(0, 256, (n, 1 + 3072), dtype=np.uint8)
        rows[:, 0] %= 10
        return rows.tobytes()

    sizes = [len(a) for a in np.array_split(np.arange(n_train), 5)]
    members = {f"data_batch_{i + 1}.bin": records(n) for i, n in enumerate(sizes)}
    members["test_batch.bin"] = records(n_test)
    members["batches.meta.txt"] = "\n".join(cnnjax.dataset_spec("cifar10").class_names).encode()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def loader_rate(images, labels, batch_size: int) -> float:
    start, n = time.perf_counter(), 0
    for batch in cnnjax.train_batches(images, labels, batch_size, seed=0, epoch=1):
        jax.block_until_ready(jax.device_put(batch))
        n += len(batch["label"])
    return n / (time.perf_counter() - start)


def train_rate(overrides: list[str], images, labels, batch_size: int, steps: int) -> float:
    spec = cnnjax.DatasetSpec("cifar-shaped", 10, SHAPE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                              ("train", "test"), False)
    parts = cnnjax.build(cnnjax.Config().override(overrides), spec, steps_per_epoch=1)
    state, step = parts.init_state(jax.random.key(0)), parts.epoch_steps[0]
    batches = list(cnnjax.train_batches(images, labels, batch_size, seed=0, epoch=1))[:steps + 1]
    rng = jax.random.key(1)
    state, _ = step(state, batches[0], rng)  # compile
    jax.block_until_ready(state)
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, _ = step(state, batch, rng)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resnet-steps", type=int, default=3)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "manual").mkdir()
        write_archive(tmp / "manual" / "cifar-10-binary.tar.gz", args.images, args.images // 5)
        cfg = DataConfig(dataset="cifar10", data_dir=str(tmp / "tfds"),
                         manual_dir=str(tmp / "manual"))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # not the official archive: known
            images, labels = cnnjax.load_split(cfg, "train")
        first = time.perf_counter() - start
        start = time.perf_counter()  # the prepared files again, not the in-memory copy
        source = cifar.CnnjaxCifar10(data_dir=cfg.data_dir).as_data_source("train")
        store.read_split(source, "train", num_classes=10)
        read = time.perf_counter() - start
    loader = statistics.median(loader_rate(images, labels, args.batch_size) for _ in range(3))
    seed = train_rate([], images, labels, args.batch_size, 20)
    resnet = train_rate(["model.name=resnet18", "model.kwargs.stem=small"], images, labels,
                        args.batch_size, args.resnet_steps)
    report = {
        "images": args.images, "batch_size": args.batch_size, "load_average": os.getloadavg()[0],
        "prepare_and_read_s": round(first, 2), "read_prepared_s": round(read, 2),
        "read_images_per_s": round(args.images / read),
        "loader_images_per_s": round(loader), "seed_cnn_train_images_per_s": round(seed, 1),
        "resnet18_train_images_per_s": round(resnet, 2),
        "loader_over_seed_cnn": round(loader / seed, 1),
        "loader_over_resnet18": round(loader / resnet, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
