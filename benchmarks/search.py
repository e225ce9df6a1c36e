"""The search's own cost: per trial against a default trial, and the sampler's proposal time.

    python benchmarks/search.py                      # 3 default trials (~3 min on 2 CPU cores)
    python benchmarks/search.py --trials 5 --history 200 --json out.json

1. A study of `--trials` trials of the default config on the embedded data (30 epochs with early
   stopping, the README's `cnnjax train`), one worker, embedded journal storage: for each trial
   the seconds spent training (`train_and_evaluate`) and the worker's own seconds around it
   (storage reads and writes, the sampler, pruning bookkeeping, the dead-worker scan, study.json).
2. TPE's proposal time with a history of `--history` finished trials over the five-parameter
   space of the README's study (learning rate, weight decay, dropout, rotation, batch size): the
   trials are added to a journal file with made-up values, then a new sampler (as the worker makes
   one per trial) asks and suggests, repeated; also the random sampler for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import tempfile
import time

import numpy as np
import optuna

from cnnjax import Config, run_search
from cnnjax.search.space import load_space
from cnnjax.search.storage import open_storage, optuna_quiet
from cnnjax.search.worker import SearchSettings, make_sampler

SPACE = {"optim.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
         "optim.weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
         "model.kwargs.dropout": {"low": 0.0, "high": 0.6},
         "augment.rotate": {"low": 0, "high": 15},
         "train.batch_size": {"choices": [32, 64, 128]}}


def trial_overhead(trials: int, root: pathlib.Path) -> dict:
    cfg = Config().override(["train.progress=false"])
    out = run_search(cfg, SPACE, trials, root / "overhead", pruner="none", quiet=True)
    rows = out["worker"]
    train = [r["train_s"] for r in rows]
    overhead = [r["overhead_s"] for r in rows]
    return {"trials": rows, "train_s_median": statistics.median(train),
            "overhead_s_median": statistics.median(overhead),
            "overhead_fraction": sum(overhead) / sum(train)}


def proposal_time(history: int, root: pathlib.Path, repeats: int) -> dict:
    space = load_space(SPACE, Config())
    storage = open_storage(root / "history", None, 60)
    with optuna_quiet():
        study = optuna.create_study(study_name="history", storage=storage)
        rng = np.random.default_rng(0)
        for i in range(history):
            params = {"optim.learning_rate": float(10 ** rng.uniform(-4, -2)),
                      "optim.weight_decay": float(10 ** rng.uniform(-6, -3)),
                      "model.kwargs.dropout": float(rng.uniform(0, 0.6)),
                      "augment.rotate": int(rng.integers(0, 16)),
                      "train.batch_size": int(rng.choice([32, 64, 128]))}
            value = (math.log10(params["optim.learning_rate"]) + 2.5) ** 2 + rng.normal(0, 0.05)
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={p.key: p.distribution for p in space.params},
                value=value))
        out = {}
        for name in ("tpe", "random"):
            settings = SearchSettings(trials=history + 1, sampler=name)
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                study.sampler = make_sampler(settings, space, history + r)
                trial = study.ask()
                space.suggest(trial)
                times.append(time.perf_counter() - t0)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            out[name] = {"median_s": statistics.median(times), "max_s": max(times)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnnjax-search-bench-") as tmp:
        root = pathlib.Path(tmp)
        proposals = proposal_time(args.history, root, args.repeats)
        overhead = trial_overhead(args.trials, root)
    result = {"overhead": overhead, "proposal": proposals, "history": args.history}
    print(f"per trial: training {overhead['train_s_median']:.1f} s, search's own cost "
          f"{overhead['overhead_s_median'] * 1000:.0f} ms (median), "
          f"{100 * overhead['overhead_fraction']:.2f} % of training time")
    for name, p in proposals.items():
        print(f"{name} proposal with {args.history} finished trials: "
              f"{p['median_s'] * 1000:.0f} ms median, {p['max_s'] * 1000:.0f} ms max")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
