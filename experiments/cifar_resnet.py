"""ResNet-18 with the small-image stem on CIFAR-10, trained with the standard recipe.

    python experiments/cifar_resnet.py --manual-dir DIR [--epochs 200] [--out checkpoints/cifar_resnet]
    python experiments/cifar_resnet.py --synthetic 2000 [--width 8] [--epochs 3]

The recipe (He et al. 2016, as most CIFAR baselines train it): SGD with Nesterov momentum 0.9,
learning rate 0.1 with cosine decay to 0 over the run, weight decay 5e-4, batch 128, 200 epochs;
augmentation a random crop from the image zero-padded by 4 pixels and a horizontal flip, drawn per
example from folded keys; no early stopping (the schedule decides); the best checkpoint by
validation accuracy on 5,000 training images held out (data.val_fraction=0.1).

Data: `cifar-10-binary.tar.gz` from https://www.cs.toronto.edu/~kriz/, downloaded by TFDS when there
is network, else given with --manual-dir. ACCURACY NOT MEASURED ON THE REAL DATA: CIFAR cannot be
downloaded where cnnjax is developed. Runtime: one batch-128 step of the full-width model takes
4.4 s on 2 CPU cores (29 images/s, benchmarks/loader.py; ResNet-18 at 32x32 is ~0.56 GFLOP per image
forward), so an epoch of 352 steps is 26 minutes and 200 epochs about 86 hours: run it on an
accelerator.

--synthetic N shows the pipeline end to end without the real archive: it writes a binary CIFAR-10
archive of N training and N/5 test images (each class a colour, plus noise and a random offset, so
that there is something to learn) into --out/synthetic-manual, prepares it into its own data dir
(so a real cifar10 prepared elsewhere is never shadowed), and trains on it. Its run is in the README.
"""

import argparse
import io
import pathlib
import tarfile
import time

import numpy as np

import cnnjax

RECIPE = [
    "data.dataset=cifar10", "data.val_fraction=0.1",
    "model.name=resnet18", "model.kwargs.stem=small",
    "optim.name=sgd", "optim.learning_rate=0.1", "optim.momentum=0.9", "optim.nesterov=true",
    "optim.weight_decay=5e-4", "optim.schedule=cosine", "optim.min_lr=0",
    "augment.crop=4", "augment.flip=true",
    "train.batch_size=128", "train.eval_batch_size=500", "train.monitor=val_accuracy",
    "train.early_stopping_patience=0",
]


def synthetic_archive(path: pathlib.Path, n_train: int, seed: int = 0) -> None:
    """A learnable stand-in for cifar-10-binary.tar.gz, in its exact format."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(96, 160, (10, 3))

    def records(n):
        labels = rng.integers(0, 10, n)
        images = rng.normal(palette[labels][:, None, None, :], 64, (n, 32, 32, 3))
        shift = rng.integers(-6, 7, (n, 2))
        images = np.stack([np.roll(im, tuple(s), (0, 1)) for im, s in zip(images, shift)])
        planes = np.clip(images, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, -1)
        return np.concatenate([labels[:, None].astype(np.uint8), planes], 1).tobytes()

    batches = np.array_split(np.arange(n_train), 5)
    members = {f"data_batch_{i + 1}.bin": records(len(b)) for i, b in enumerate(batches)}
    members["test_batch.bin"] = records(max(n_train // 5, 10))
    names = cnnjax.dataset_spec("cifar10").class_names
    members["batches.meta.txt"] = "\n".join(names).encode() + b"\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("checkpoints/cifar_resnet"))
    parser.add_argument("--manual-dir", help="holds cifar-10-binary.tar.gz (offline)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="train on N synthetic images in CIFAR's format instead")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--width", type=int, default=64, help="channels of layer1 (64: ResNet-18)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override")
    args = parser.parse_args()
    overrides = RECIPE + [f"train.epochs={args.epochs}", f"model.kwargs.width={args.width}",
                          f"train.seed={args.seed}"]
    name = f"s{args.seed}"
    if args.synthetic:
        manual = args.out / "synthetic-manual"
        manual.mkdir(parents=True, exist_ok=True)
        synthetic_archive(manual / "cifar-10-binary.tar.gz", args.synthetic, args.seed)
        overrides += [f"data.manual_dir={manual}", f"data.data_dir={args.out / 'synthetic-tfds'}",
                      "train.batch_size=64"]
        name = f"synthetic{args.synthetic}-w{args.width}-s{args.seed}"
    elif args.manual_dir:
        overrides.append(f"data.manual_dir={args.manual_dir}")
    cfg = cnnjax.Config().override(overrides + args.set)
    start = time.perf_counter()
    result = cnnjax.train_and_evaluate(cfg, args.out / name)
    summary = result.summary
    print(f"{args.out / name}: {time.perf_counter() - start:.0f} s, best epoch "
          f"{summary['best_epoch']}, val accuracy {summary['val']['accuracy']:.4f}, test accuracy "
          f"{summary['test']['accuracy']:.4f}"
          + (" (synthetic data)" if args.synthetic else ""))


if __name__ == "__main__":
    main()
