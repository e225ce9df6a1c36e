"""Bring your own: a model, data and optimizer of the researcher's, trained with every cnnjax
guarantee, then reloaded and used in a fresh process.

    python experiments/custom_model.py [--out checkpoints/custom_model] [--epochs 30]

- the model, `DigitsNet`, is a Flax module defined here (not in cnnjax), reached by its import
  path `custom_model:DigitsNet` with constructor arguments in `model.kwargs`;
- the data, `digits()`, are scikit-learn's 1,797 8x8 digits as numpy arrays (installed with
  mlxtend), reached as `custom_model:digits`: image size, channels, class count and per-channel
  normalization come from the arrays;
- AdamW with a linear warmup and cosine decay, label smoothing 0.1, early stopping on
  validation accuracy;
- then, in a new Python process that knows only the run directory (and this directory on
  PYTHONPATH), `cnnjax.load_run(...).predict` on the test digits.
About a minute on 2 CPU cores; prints the test accuracy of both processes, which must agree.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


class DigitsNet(nn.Module):
    """Two 3x3 conv layers with GELUs, global average pooling, dropout and a linear head."""

    num_classes: int
    width: int = 32
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(2):
            x = nn.gelu(nn.Conv(self.width * (i + 1), (3, 3), name=f"conv{i + 1}")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(self.num_classes, name="head")(x)


def digits():
    """scikit-learn's digits: uint8 images (N, 8, 8) scaled to 0..255, labels 0..9; the last
    397 are the test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)
    return {"train": (images[:1400], d.target[:1400]), "test": (images[1400:], d.target[1400:])}


RELOAD = """
import json, sys
import numpy as np
import cnnjax
from custom_model import digits
run = cnnjax.load_run(sys.argv[1])
images, labels = digits()["test"]
print(json.dumps({"accuracy": float(np.mean(run.predict(images) == labels))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("checkpoints/custom_model"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))  # so that custom_model:... imports, as it will in the new process
    import cnnjax

    cfg = cnnjax.Config().override([
        "model.name=custom_model:DigitsNet", 'model.kwargs={"width": 32, "dropout": 0.2}',
        "data.dataset=custom_model:digits", f"train.epochs={args.epochs}", "train.batch_size=50",
        "optim.name=adamw", "optim.weight_decay=0.05", "optim.learning_rate=3e-3",
        "optim.schedule=warmup_cosine", "optim.warmup_steps=50",
        "train.label_smoothing=0.1", "train.monitor=val_accuracy", "train.progress=false"])
    run_dir = args.out / f"s{cfg.train.seed}"
    result = cnnjax.train_and_evaluate(cfg, run_dir)
    summary = result.summary
    print(f"trained {run_dir}: best epoch {summary['best_epoch']}, val accuracy "
          f"{summary['val']['accuracy']:.4f}, test accuracy {summary['test']['accuracy']:.4f}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", RELOAD, str(run_dir)], capture_output=True,
                         text=True, env=env, check=True)
    fresh = json.loads(out.stdout)["accuracy"]
    print(f"a fresh process reloaded it: test accuracy {fresh:.4f}")
    if abs(fresh - summary["test"]["accuracy"]) > 1e-9:
        raise SystemExit("the reloaded run predicts differently from the trained one")


if __name__ == "__main__":
    main()
