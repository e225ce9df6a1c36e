"""What checkpoint checksums cost on the default run: seconds blocked on saves, and their share of
epoch time, with the checksums on and off.

    python benchmarks/checkpoint_cost.py                 # default config, 5 epochs per variant
    python benchmarks/checkpoint_cost.py --epochs 30 --repeats 3 --json out.json

The checksums are written by orbax's post-finalization hook, in its background thread, so the
training loop only waits for them when a save comes before the previous one has finished (and at
the end). Each variant trains the default config into a fresh run directory; "off" replaces the
hook with a no-op. Variants alternate within one process, since this machine is shared and noisy:
read medians. The hook's own time (hashing every file of a step) is reported too.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

from cnnjax import Config, train_and_evaluate
from cnnjax.training import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    cfg = Config().override([f"train.epochs={args.epochs}", "train.progress=false"])

    hook_seconds: list[float] = []
    write = checkpoint.write_checksums

    def timed_write(step_dir):
        t0 = time.perf_counter()
        write(step_dir)
        hook_seconds.append(time.perf_counter() - t0)

    checkpoint.write_checksums = timed_write
    hook = checkpoint.Checkpointer._record_checksums
    results = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in ("off", "on"):
                checkpoint.Checkpointer._record_checksums = hook if variant == "on" else (
                    lambda self: None)
                run_dir = pathlib.Path(tmp) / f"{variant}-{repeat}"
                train_and_evaluate(cfg, run_dir)
                summary = json.loads((run_dir / "summary.json").read_text())
                results[variant].append({k: summary[k] for k in (
                    "checkpoint_seconds", "checkpoint_fraction_of_epoch_time", "epochs_run")})
        step_bytes = sum(p.stat().st_size for p in (run_dir / "ckpt").glob("[0-9]*/**/*")
                         if p.is_file())
    checkpoint.Checkpointer._record_checksums = hook
    report = {
        variant: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for variant, rows in results.items()}
    report["hook_seconds_per_save_median"] = statistics.median(hook_seconds)
    report["checkpoint_bytes_on_disk"] = step_bytes
    report["runs"] = results
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
