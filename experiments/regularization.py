"""Fighting overfitting on mnist5k: baseline, +dropout, +batch norm, +augmentation, all together.

    python experiments/regularization.py [--epochs 30] [--seed 0] [--out checkpoints/regularization]

Each variant is the default SeedCNN config plus its overrides, trained with the same seed and epoch
budget (early stopping on). Writes `comparison.md`, `comparison.csv` and `val_curves.png` in --out,
and each variant's run directory beside them. The train-val gap is measured with the best
parameters in evaluation mode on both splits (the logged training loss has dropout and augmentation
on, which would flatter the regularized variants). Figures from one run are in the README.
"""

import argparse
import csv
import pathlib
import time

from cnnjax import Config, load_data, load_run, new_figure, read_jsonl, train_and_evaluate

AUGMENT = ["augment.rotate=10", "augment.translate=2", "augment.scale=0.1"]
VARIANTS = {
    "baseline": [],
    "dropout": ["model.kwargs.dropout=0.5"],
    "batch_norm": ["model.kwargs.batch_norm=true"],
    "augment": AUGMENT,
    "all": ["model.kwargs.dropout=0.5", "model.kwargs.batch_norm=true", *AUGMENT],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("checkpoints/regularization"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for name in args.variants:
        cfg = Config().override([f"train.epochs={args.epochs}", f"train.seed={args.seed}",
                                 "train.progress=false", *VARIANTS[name]])
        t0 = time.perf_counter()
        result = train_and_evaluate(cfg, args.out / f"{args.seed}-{name}-{int(time.time())}")
        summary, run_dir = result.summary, result.run_dir
        wall = time.perf_counter() - t0
        epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
        curves[name] = ([r["epoch"] for r in epochs], [r["val_accuracy"] for r in epochs])
        data = load_data(cfg.data, cfg.train.seed)
        train_loss = load_run(run_dir).evaluate(*data.train)["loss"]  # in evaluation mode
        rows.append({"variant": name, "best_val_accuracy": summary["val"]["accuracy"],
                     "test_accuracy": summary["test"]["accuracy"], "best_epoch": summary["best_epoch"],
                     "epochs_run": summary["epochs_run"], "train_loss": train_loss,
                     "val_loss": summary["val"]["loss"], "gap": summary["val"]["loss"] - train_loss,
                     "wall_s": wall})
        print(rows[-1], flush=True)

    with open(args.out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| variant | best val acc | test acc | best epoch / run | train loss | val loss | val−train gap | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['best_val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['best_epoch']} / {r['epochs_run']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
              f"{r['gap']:.4f} | {r['wall_s']:.0f} |" for r in rows]
    (args.out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = new_figure(figsize=(7, 4.5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=f"mnist5k, seed {args.seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "val_curves.png", dpi=110)
    print(f"wrote {args.out}/comparison.md, comparison.csv, val_curves.png")


if __name__ == "__main__":
    main()
