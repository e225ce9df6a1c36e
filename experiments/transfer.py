"""Transfer between halves of MNIST: a ResNet-18 pretrained on digits 0-4 learns digits 5-9.

    python experiments/transfer.py [--width 8] [--steps 200] [--seeds 0 1 2] [--out checkpoints/transfer]

1. Pretrain: `cnnjax train` (`train_and_evaluate`) of ResNet-18 with the small-image stem on the
   mnist5k digits 0-4 (data.classes), early stopping on, into --out/pretrain-0to4 (reused if there).
2. Learn digits 5-9 (relabelled 0-4) with the same step budget, batch and optimizer (the default
   Adam/AMSGrad, lr 1e-3), each variant from a new 5-way head:
     frozen     the pretrained backbone frozen (BN in inference mode), only the head trains
     frozen_lr1e-2  the same with learning rate 1e-2 (the others keep 1e-3)
     unfreeze   frozen, then layer4 trains too from epoch 3 on (after 2 epochs, 48-50 steps)
     finetune   the pretrained backbone and the head all train
     scratch    the same network from a random initialization
   and measure test accuracy on the 500 test digits 5-9 at the budgets in --at (nothing is selected
   on them: every variant runs its full budget). Each variant and seed is one `train_and_evaluate`
   run (plateau rule on, early stopping off) stopped after the budget, with a `Periodic` callback
   that evaluates the test digits at those steps.
Writes transfer.md (the table), transfer.csv and transfer.png (accuracy against steps) in --out.
About 8 minutes on 2 CPU cores (480 s measured); figures from one run are in the README.

Width: full ResNet-18 (width 64) takes ~6.3 s per batch-64 step with the small stem on 2 busy CPU
cores, so the default is the same depth at width 8 (layer1..4: 8, 16, 32, 64 channels; 0.16 s per
step, 0.05 s with the backbone frozen). --width 64 runs the real thing.
"""

import argparse
import csv
import json
import pathlib
import shutil
import time

import jax
import numpy as np

import cnnjax
from cnnjax import Config, new_figure, train_and_evaluate

FIRST, SECOND = "0,1,2,3,4", "5,6,7,8,9"
VARIANTS = {
    "frozen": ["transfer.freeze=backbone"],
    # A linear probe moves slowly at lr 1e-3 (Adam steps of at most ~lr per weight); the usual
    # larger rate for a head alone. The only variant whose optimizer differs.
    "frozen_lr1e-2": ["transfer.freeze=backbone", "optim.learning_rate=1e-2"],
    "unfreeze": ["transfer.freeze=backbone", "transfer.unfreeze=layer4",
                 "transfer.unfreeze_after_epochs=2"],
    "finetune": [],
    "scratch": None,  # no backbone
}


def model_settings(width: int) -> list[str]:
    return ["model.name=resnet18", f"model.kwargs.width={width}", "model.kwargs.stem=small",
            "train.progress=false"]


def pretrain(out: pathlib.Path, width: int, epochs: int) -> pathlib.Path:
    run_dir = out / "pretrain-0to4"
    if (run_dir / "summary.json").exists():
        print(f"reusing the pretrained backbone in {run_dir}")
        return run_dir
    cfg = Config().override([*model_settings(width), f"data.classes={FIRST}",
                             f"train.epochs={epochs}"])
    summary = train_and_evaluate(cfg, run_dir).summary
    print(f"pretrained on digits 0-4: test accuracy {summary['test']['accuracy']:.4f} after "
          f"{summary['steps']} steps ({summary['wall_time_s']:.0f} s)", flush=True)
    return run_dir


def learning_curve(cfg: Config, seed: int, budget: int, at: list[int], run_dir: pathlib.Path
                   ) -> tuple[dict[int, float], float]:
    """Test accuracy at the steps in `at` of one `train_and_evaluate` run stopped after `budget`
    steps (a callback evaluates; nothing is selected on the test digits), and its ms per step."""
    shutil.rmtree(run_dir, ignore_errors=True)
    data = cnnjax.load_data(cfg.data, seed)
    epochs = -(-budget // cnnjax.steps_per_epoch(len(data.train[1]), cfg.train.batch_size))
    cfg = cfg.override([f"train.seed={seed}", f"train.epochs={epochs}",
                        "train.early_stopping_patience=0"])
    probe = cnnjax.Periodic(lambda event: event.evaluate("test")["accuracy"], at_steps=at)
    timer = StepTimer()
    train_and_evaluate(cfg, run_dir, callbacks=[probe, timer], stop_at_step=budget)
    return dict(probe.results), 1000 * float(np.median(timer.seconds))


class StepTimer(cnnjax.Callback):
    """Seconds between consecutive train steps, each waited for, from step 3 on (the first steps
    of each compiled function include compiling); the median ignores the evaluations' gaps."""

    def __init__(self):
        self.seconds, self._last = [], None

    def on_step(self, event):
        jax.block_until_ready(event.state.step)
        now = time.perf_counter()
        if self._last is not None and event.step > 2:
            self.seconds.append(now - self._last)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--at", type=int, nargs="*", default=[0, 5, 10, 20, 50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("checkpoints/transfer"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    at = sorted(s for s in set(args.at) if s <= args.steps)
    t_start = time.perf_counter()
    backbone = pretrain(args.out, args.width, args.pretrain_epochs)
    pre_summary = json.loads((backbone / "summary.json").read_text())

    base = Config().override([*model_settings(args.width), f"data.classes={SECOND}"])
    data = cnnjax.load_data(base.data, base.train.seed)
    steps_per_epoch = cnnjax.steps_per_epoch(len(data.train[1]), base.train.batch_size)
    curves, speed = {}, {}
    for name in args.variants:
        overrides = VARIANTS[name]
        cfg = base if overrides is None else base.override([f"transfer.backbone={backbone}",
                                                            *overrides])
        t0 = time.perf_counter()
        runs = [learning_curve(cfg, seed, args.steps, at, args.out / "runs" / f"{name}-s{seed}")
                for seed in args.seeds]
        curves[name] = [curve for curve, _ in runs]
        speed[name] = float(np.median([ms for _, ms in runs])) / 1000
        mean = {s: np.mean([c[s] for c in curves[name]]) for s in at}
        print(f"{name:9s} " + "  ".join(f"{s}:{mean[s]:.3f}" for s in at)
              + f"   ({time.perf_counter() - t0:.0f} s, {speed[name] * 1000:.0f} ms/step)", flush=True)

    rows = []
    for name, per_seed in curves.items():
        for s in at:
            accs = [c[s] for c in per_seed]
            rows.append({"variant": name, "step": s, "mean_accuracy": float(np.mean(accs)),
                         "min_accuracy": float(np.min(accs)), "max_accuracy": float(np.max(accs)),
                         "seeds": len(accs)})
    with open(args.out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = {(r["variant"], r["step"]): r for r in rows}
    cell = lambda r: (f"{r['mean_accuracy']:.3f}" if r["seeds"] == 1 else
                      f"{r['mean_accuracy']:.3f} ({r['min_accuracy']:.3f}–{r['max_accuracy']:.3f})")
    lines = [f"Test accuracy on mnist5k digits 5–9 (500 digits) after N steps of batch "
             f"{base.train.batch_size} ({steps_per_epoch} steps per epoch), mean (min–max) over seeds "
             f"{args.seeds}. ResNet-18, small stem, width {args.width}; backbone pretrained on digits "
             f"0–4 for {pre_summary['steps']} steps (test accuracy {pre_summary['test']['accuracy']:.4f}).",
             "", "| variant | " + " | ".join(f"{s} steps" for s in at) + " | ms/step |",
             "|---|" + "---|" * (len(at) + 1)]
    lines += [f"| {name} | " + " | ".join(cell(table[name, s]) for s in at)
              + f" | {speed[name] * 1000:.0f} |" for name in curves]
    (args.out / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = new_figure(figsize=(7, 4.5))
    xs = [max(s, 1) for s in at]  # step 0 is drawn at 1 on the log axis
    for name in curves:
        ys = [table[name, s]["mean_accuracy"] for s in at]
        lo = [table[name, s]["min_accuracy"] for s in at]
        hi = [table[name, s]["max_accuracy"] for s in at]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xscale("log")
    ax.set(xlabel="training steps on digits 5–9 (step 0 drawn at 1)", ylabel="test accuracy",
           title=f"ResNet-18 (width {args.width}) pretrained on 0–4, learning 5–9")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "transfer.png", dpi=110)
    print(f"wrote {args.out}/transfer.md, transfer.csv, transfer.png "
          f"({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
