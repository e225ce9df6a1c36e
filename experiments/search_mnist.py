"""A 20-trial TPE study of the seed CNN on the embedded digits, with and without pruning, against
the default config.

    python experiments/search_mnist.py                 # about 1 h on 2 CPU cores
    python experiments/search_mnist.py --trials 8 --out checkpoints/search_mnist_small

Searches learning rate (log 1e-4..1e-2), weight decay (log 1e-6..1e-3), dropout (0..0.6),
rotation (0..15 degrees) and batch size {32, 64, 128}, with the default config's everything else
(30 epochs, early stopping, seed 0: every trial on the same validation split and batch order),
once with the median pruner and once without, then trains the default config. Writes
`<out>/search_mnist.md`: best validation and test accuracy of each study against the default's,
wall time, trials completed per hour, and the best value reached.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import cnnjax

SPACE = {"optim.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
         "optim.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
         "model.kwargs.dropout": {"low": 0.0, "high": 0.6},
         "augment.rotate": {"low": 0, "high": 15},
         "train.batch_size": {"choices": [32, 64, 128]}}


def study(out: pathlib.Path, name: str, trials: int, pruner: str) -> dict:
    cfg = cnnjax.Config().override(["train.progress=false"])
    t0 = time.perf_counter()
    record = cnnjax.run_search(cfg, SPACE, trials, out / name, pruner=pruner)
    seconds = time.perf_counter() - t0
    best = record["best"]
    run = json.loads((out / name / best["run_dir"] / "summary.json").read_text())
    states = [t["state"] for t in record["trials"]]
    return {"name": name, "seconds": seconds, "best_trial": best["number"],
            "best_params": best["params"], "best_val_loss": best["value"],
            "val_accuracy": run["val"]["accuracy"], "test_accuracy": run["test"]["accuracy"],
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "trials_per_hour": len(states) / seconds * 3600}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("checkpoints/search_mnist"))
    args = parser.parse_args(argv)
    rows = [study(args.out, "pruned", args.trials, "median"),
            study(args.out, "unpruned", args.trials, "none")]
    t0 = time.perf_counter()
    default = cnnjax.train_and_evaluate(cnnjax.Config().override(["train.progress=false"]),
                                        args.out / "default").summary
    lines = ["| run | best val loss | val accuracy | test accuracy | trials (complete / pruned) "
             "| wall time | trials per hour |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| TPE, {r['name']} (best trial {r['best_trial']}) | "
                     f"{r['best_val_loss']:.4f} | {r['val_accuracy']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['complete']} / {r['pruned']} | "
                     f"{r['seconds'] / 60:.1f} min | {r['trials_per_hour']:.1f} |")
    lines.append(f"| default config | {default['val']['loss']:.4f} | "
                 f"{default['val']['accuracy']:.4f} | {default['test']['accuracy']:.4f} | - | "
                 f"{(time.perf_counter() - t0) / 60:.1f} min | - |")
    lines += ["", *(f"best of {r['name']}: {json.dumps(r['best_params'])}" for r in rows)]
    text = "\n".join(lines) + "\n"
    (args.out / "search_mnist.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
