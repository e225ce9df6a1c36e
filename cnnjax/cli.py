"""The `cnnjax` command: parses a config and calls one library function.

    cnnjax train [--config FILE] [--dataset mnist5k] [--epochs N] [--batch-size B] [--seed S]
                 [--set key=value ...]
    cnnjax train --resume DIR
    cnnjax eval --run DIR [--dataset NAME] [--split test] [--step N]
    cnnjax visualize --run DIR [--images INDEX|FILE ...] [--layer NAME ...]
    cnnjax sweep --seeds N [--lowering loop|vmap|unroll] [the train flags]
    cnnjax search --space SPACE --trials N [--study DIR] [--storage URL]
                  [--sampler tpe|random|grid|cmaes] [--pruner median|hyperband|halving|none]
                  [the train flags]
    cnnjax search --show STUDY [--storage URL]
    cnnjax compare RUN... | STUDY [--out DIR]
    cnnjax ensemble --runs RUN... | --study S [--top K] [--weights uniform|val]
                    [--method average|greedy] [--logits] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from cnnjax.config import Config
from cnnjax.imports import UserCodeError


def _config_flags(p, seed_help: str | None = None) -> None:
    """The flags `config_from_args` reads, shared by train and sweep."""
    p.add_argument("--dataset", help="mnist5k (default, embedded), mnist, fashion_mnist, cifar10, "
                   "cifar100, imagefolder:PATH, tfds:NAME[/CONFIG][:VERSION], a registered name "
                   "or package.module:function")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, help=seed_help)
    p.add_argument("--data-dir", help="TFDS data directory (default ~/.cache/cnnjax/tfds)")
    p.add_argument("--manual-dir", help="directory holding the official files when offline: the "
                   "four IDX .gz files (mnist, fashion_mnist) or cifar-10/100-binary.tar.gz")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set optim.learning_rate=3e-4 --set model.kwargs.features=16,32")
    p.add_argument("--config", type=pathlib.Path, metavar="FILE",
                   help="start from a saved config.json (any run's), the other flags on top")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run directory",
                       description="Train a model; the run directory gets config.json, metrics.jsonl, "
                                   "summary.json, plots and the best parameters. SIGTERM or Ctrl-C "
                                   "checkpoints at the next step and exits (143, 130); --resume "
                                   "continues it byte for byte.")
    _config_flags(p)
    p.add_argument("--run-dir", type=pathlib.Path,
                   help="where to write the run (default checkpoints/<dataset>-<model>-s<seed>-<time>); "
                        "a directory with checkpoints is resumed")
    p.add_argument("--resume", type=pathlib.Path, metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint, with its own config")
    p.add_argument("--stop-at-step", type=int, metavar="N",
                   help="checkpoint and exit at the first log line at or after step N (rerun to continue)")
    dist = p.add_argument_group("multi-host (jax.distributed); also read from JAX_COORDINATOR_ADDRESS, "
                                "JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    dist.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of configurations x seeds side by side in one "
                                     "process, each member a run directory",
                       description="Trains every combination of the --grid values with each "
                                   "seed (train.seed, train.seed+1, ...), each member exactly as "
                                   "its own `cnnjax train` run would and into a run directory of "
                                   "its own in --out, and prints each member's result and who "
                                   "left (stopped early, or diverged) at which step. SIGTERM or "
                                   "Ctrl-C checkpoints every member at the next step and exits "
                                   "(143, 130); started again with the same command, or with "
                                   "--resume DIR, it continues where it stopped.")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                   help="one config key's values, e.g. --grid 'optim.learning_rate=[1e-3,3e-3]'; "
                        "repeat for every combination. Keys that change no shape or program: "
                        "optim.learning_rate, weight_decay, b1, b2, eps, momentum; "
                        "model.kwargs.dropout, conv_dropout (seed_cnn); train.label_smoothing; "
                        "augment.rotate, translate, scale, mixup, cutmix; optim.plateau_factor, "
                        "plateau_patience, plateau_threshold; train.early_stopping_patience. "
                        "Others are refused, with why")
    p.add_argument("--seeds", type=int,
                   help="seeds of each combination (default 8 without --grid, 1 with it)")
    p.add_argument("--lowering", choices=("loop", "vmap", "unroll"),
                   help="how the members share the machine: loop (each its own compiled step; "
                        "the default on CPU), vmap (one program over all members; the default "
                        "elsewhere), unroll (the members' steps written into one program)")
    _config_flags(p, seed_help="the first seed (default: train.seed)")
    p.add_argument("--out", type=pathlib.Path,
                   help="output directory (default checkpoints/sweep-<dataset>-<model>-s<seed>xN-"
                        "<time>); a sweep of the same plan there is resumed")
    p.add_argument("--resume", type=pathlib.Path, metavar="DIR",
                   help="continue the sweep in DIR with its own plan (DIR/sweep.json)")


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="search over configurations with Optuna; every trial a run",
                       description="Fills a study with --trials finished trials, each a cnnjax "
                                   "train run of the fixed config (the train flags, --set) with "
                                   "the trial's values of the space; the objective is "
                                   "train.monitor on validation at the best epoch. Run the same "
                                   "command again to continue a study, on any number of machines "
                                   "with --storage.")
    p.add_argument("--space", metavar="SPACE",
                   help="a TOML or JSON file mapping config keys to {low, high[, log][, step]} "
                        "or {choices: [...]}, or a registered space or package.module:function "
                        "(trial) -> {key: value}")
    p.add_argument("--trials", type=int, help="the finished trials the study should hold")
    p.add_argument("--study", type=pathlib.Path, metavar="DIR",
                   help="the study directory (default checkpoints/search-<space>); its last "
                        "component names the study in a database")
    p.add_argument("--storage", metavar="URL", help="a database shared by workers on many "
                   "machines, e.g. postgresql://user@host/db (default: a journal file in DIR)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid", "cmaes"))
    p.add_argument("--pruner", default="median", choices=("median", "hyperband", "halving", "none"))
    p.add_argument("--study-seed", type=int, default=0, help="seeds the sampler (default 0)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S",
                   help="seconds between a running trial's heartbeats in a database; a trial "
                        "silent for 3x this long is taken over (default 60)")
    p.add_argument("--batch", type=int, default=1, metavar="K",
                   help="ask K trials at a time and train them as one sweep (one program under "
                        "--lowering vmap); the space may hold only values a sweep can vary")
    p.add_argument("--lowering", choices=("loop", "vmap", "unroll"),
                   help="how a batch's trials share the step (default: loop on CPU, vmap "
                        "elsewhere)")
    p.add_argument("--show", type=pathlib.Path, metavar="STUDY",
                   help="print the table of a study (with --storage for one in a database)")
    _config_flags(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run's best parameters on a dataset split")
    p.add_argument("--run", required=True, type=pathlib.Path, help="a run directory")
    p.add_argument("--dataset", help="default: the run's own dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--manual-dir")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--step", type=int, help="a checkpoint step (default: the best one)")


def _visualize_parser(sub) -> None:
    p = sub.add_parser("visualize", help="feature maps, act-max, saliency, filter health and "
                                         "report.html for a run")
    p.add_argument("--run", required=True, type=pathlib.Path, help="a run directory")
    p.add_argument("--images", nargs="+", metavar="INDEX|FILE",
                   help="test-set indices and/or .npy/.png files (default: one test image of each "
                        "of the first four classes)")
    p.add_argument("--layer", nargs="+", help="layers for channel grids and act-max (default: "
                                              "grids of the top-level maps, act-max of the last "
                                              "feature layer, e.g. conv2, and of 'logits')")
    p.add_argument("--cam-layer", help="Grad-CAM's layer (default: the last feature layer's "
                                       "rectified map, e.g. 'pool2:in' = ReLU(conv2), the map "
                                       "pool2 reads)")
    p.add_argument("--recognizer", type=pathlib.Path,
                   help="another run directory (e.g. another seed) whose model classifies the "
                        "act-max class images")
    p.add_argument("--scale", choices=("channel", "shared"), default="channel",
                   help="feature-map colour scale: per channel or shared by a layer's channels")
    p.add_argument("--seed", type=int, help="act-max, SmoothGrad and re-init key (default: the run's)")
    p.add_argument("--actmax-steps", type=int, default=256)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="one HTML page comparing many runs or a study",
                       description="Ranks the runs by their monitor and writes compare.html: the "
                                   "settings that differ, each config against the best, learning "
                                   "curves, calibration, and a study's history, importances, "
                                   "parallel coordinates and slices.")
    p.add_argument("sources", nargs="+", type=pathlib.Path, metavar="RUN|STUDY",
                   help="run directories, directories holding runs, or one study directory")
    p.add_argument("--out", type=pathlib.Path, help="output directory (default: <dir>/compare "
                   "for a study or one directory of runs, else checkpoints/compare-<time>)")
    p.add_argument("--no-calibration", action="store_true",
                   help="read the JSON files only: no parameters loaded, no calibration section")


def _ensemble_parser(sub) -> None:
    p = sub.add_parser("ensemble", help="evaluate the best runs of a set or a study as one model",
                       description="Averages the class probabilities of the top runs (ranked by "
                                   "validation), evaluates on test and writes ensemble.json.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--runs", nargs="+", type=pathlib.Path, metavar="RUN",
                       help="run directories or directories holding runs")
    which.add_argument("--study", type=pathlib.Path, metavar="S", help="a study directory")
    p.add_argument("--top", type=int, metavar="K", help="the K best runs (default: all)")
    p.add_argument("--weights", choices=("uniform", "val"), default="uniform",
                   help="val: proportional to 1 / each member's validation loss")
    p.add_argument("--method", choices=("average", "greedy"), default="average",
                   help="greedy: Caruana's forward selection on the shared validation split")
    p.add_argument("--logits", action="store_true", help="average logits, not probabilities")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=pathlib.Path, help="output directory (default: <study>/ensemble "
                   "or checkpoints/ensemble-<time>)")


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The defaults (or a resumed run's `base` config) with the command line's flags applied."""
    flags = {"data.dataset": args.dataset, "train.epochs": args.epochs,
             "train.batch_size": args.batch_size, "train.seed": args.seed,
             "data.data_dir": args.data_dir, "data.manual_dir": args.manual_dir}
    if base is None and getattr(args, "config", None) is not None:
        base = _read_config_file(args.config)
    cfg = base or Config()
    for key, value in flags.items():
        if value is not None:
            cfg = cfg.set(key, value)
    cfg = cfg.override(args.overrides)
    if args.quiet:
        cfg = cfg.set("train.progress", False)
    return cfg


def _read_config_file(path: pathlib.Path) -> Config:
    """A config.json (a run's, or written by hand), read through the same checks as a run's."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; give a run's config.json.")
    try:
        return Config.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid JSON ({err}).") from None
    except ValueError as err:
        raise ValueError(f"--config {path}: {err}") from None


def _run_train(args) -> int:
    from cnnjax.training import parallel

    parallel.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from cnnjax.training.runs import load_config
    from cnnjax.training.loop import train_and_evaluate

    run_dir = args.resume or args.run_dir
    if args.resume and args.run_dir and args.resume != args.run_dir:
        raise ValueError("give either --resume DIR or --run-dir DIR, not two different directories.")
    if args.resume and args.config:
        raise ValueError("--resume DIR continues the run with its own config; --config FILE "
                         "starts a new one: give one of them.")
    if args.resume and (args.resume / "summary.json").is_file():
        summary = json.loads((args.resume / "summary.json").read_text(encoding="utf-8"))
        print(f"run {args.resume} finished: best epoch {summary['best_epoch']}, val accuracy "
              f"{summary['val']['accuracy']:.4f}, test accuracy {summary['test']['accuracy']:.4f}; "
              f"nothing to resume (cnnjax eval --run {args.resume} evaluates it).")
        return 0
    base = load_config(args.resume) if args.resume else None
    result = train_and_evaluate(config_from_args(args, base), run_dir, stop_at_step=args.stop_at_step)
    if result.preempted and not result.finished:
        from cnnjax.training import preempt

        print(f"run {result.run_dir}: {result.stop_reason}; continue with: cnnjax train --resume "
              f"{result.run_dir}")
        return preempt.exit_status(result.preempted)
    if not result.finished:
        print(f"run {result.run_dir}: {result.stop_reason}; "
              f"continue with: cnnjax train --resume {result.run_dir}")
        return 0
    if result.summary is None:  # processes other than the first report nothing
        return 0
    summary = result.summary
    print(f"run {result.run_dir}: best epoch {summary['best_epoch']}, "
          f"val accuracy {summary['val']['accuracy']:.4f}, test accuracy "
          f"{summary['test']['accuracy']:.4f}, {summary['train_images_per_s']:.0f} images/s, "
          f"{summary['wall_time_s']:.1f}s")
    if result.preempted:  # it came during the run's last evaluation: the run is complete
        from cnnjax.training import preempt

        return preempt.exit_status(result.preempted)
    return 0


def _run_sweep(args) -> int:
    from cnnjax.training import preempt
    from cnnjax.training.grid import parse_grid
    from cnnjax.training.sweep import resume_sweep, run_sweep
    from cnnjax.training.rundir import default_run_dir

    if args.resume:
        given = [flag for flag, value in (
            ("--grid", args.grid), ("--seeds", args.seeds), ("--lowering", args.lowering),
            ("--set", args.overrides), ("--config", args.config), ("--out", args.out),
            ("--dataset", args.dataset), ("--epochs", args.epochs),
            ("--batch-size", args.batch_size), ("--seed", args.seed),
            ("--data-dir", args.data_dir), ("--manual-dir", args.manual_dir))
            if value not in (None, [])]
        if given:
            raise ValueError(f"--resume DIR continues the sweep with its own plan; "
                             f"{', '.join(given)} would change it: give --resume DIR alone (or "
                             f"--quiet).")
        summary = resume_sweep(args.resume, progress=False if args.quiet else None)
    else:
        grid = parse_grid(args.grid)
        seeds = args.seeds if args.seeds is not None else (1 if grid else 8)
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}.")
        cfg = config_from_args(args)
        first, out = cfg.train.seed, args.out
        if out is None:
            run_dir = default_run_dir(cfg)
            out = run_dir.with_name("sweep-" + run_dir.name.replace(f"-s{first}-",
                                                                    f"-s{first}x{seeds}-"))
        summary = run_sweep(cfg, range(first, first + seeds), out, args.lowering, grid)
    _print_sweep(summary)
    if summary["preempted"] and summary["status"] != "finished":
        print(f"sweep {summary['out_dir']}: stopped by {summary['preempted']}; continue with: "
              f"cnnjax sweep --resume {summary['out_dir']}")
    return preempt.exit_status(summary["preempted"]) if summary["preempted"] else 0


def _print_sweep(summary: dict) -> None:
    """One line per member (its result, or why and where it left), then mean ± std."""
    members = summary["members"]
    width = max(len("member"), *(len(m["name"]) for m in members))
    print(f"{'member':<{width}}  {'status':<13} {'step':>6} {'best epoch':>10} {'val acc':>8} "
          f"{'test acc':>8}")
    for m in members:
        status = "stopped early" if m.get("reason") and "test" in m else m["status"]
        step = m.get("step", m.get("steps", ""))
        if "test" in m:
            figures = (f"{m['best_epoch']:>10} {m['val']['accuracy']:>8.4f} "
                       f"{m['test']['accuracy']:>8.4f}")
        else:
            figures = f"{'-':>10} {'-':>8} {'-':>8}"
        print(f"{m['name']:<{width}}  {status:<13} {step!s:>6} {figures}")
    for m in summary["left"]:
        print(f"  {m['name']} left at step {m['step']}: {m['reason']}")
    for group in summary["groups"]:
        if len(group["seeds"]) > 1:
            values = ", ".join(f"{k}={v}" for k, v in group["values"].items())
            print(f"{values}: test accuracy {group['test_accuracy_mean']:.4f} ± "
                  f"{group['test_accuracy_std']:.4f} over {len(group['seeds'])} seeds")
    finished = [m for m in members if "test" in m]
    rate = summary["aggregate_train_images_per_s"]
    print(f"sweep {summary['out_dir']}: {len(finished)} of {len(members)} members finished"
          + (f", test accuracy {summary['test_accuracy_mean']:.4f} ± "
             f"{summary['test_accuracy_std']:.4f}" if finished and not summary["keys"] else "")
          + (f", {rate:.0f} images/s in all" if rate else "")
          + f", {summary['wall_time_s']:.1f}s")


def _run_search(args) -> int:
    from cnnjax.search import run_search, show

    if args.show is not None:
        print(show(args.show, args.storage))
        return 0
    if args.space is None or args.trials is None:
        raise ValueError("cnnjax search needs --space SPACE and --trials N (or --show STUDY).")
    from cnnjax.training import preempt

    again = ("run the same command again to continue the study (the interrupted trial resumes "
             "from its last checkpoint).")
    try:
        out = run_search(config_from_args(args), args.space, args.trials, args.study,
                         storage=args.storage, sampler=args.sampler, pruner=args.pruner,
                         study_seed=args.study_seed, heartbeat=args.heartbeat,
                         batch=args.batch, lowering=args.lowering)
    except KeyboardInterrupt:  # a second Ctrl-C: aborted at once
        print(f"cnnjax search: interrupted; {again}", file=sys.stderr)
        return 130
    if out["preempted"]:
        print(f"cnnjax search: stopped by {out['preempted']}; {again}", file=sys.stderr)
        return preempt.exit_status(out["preempted"])
    return 0


def _run_eval(args) -> int:
    from cnnjax.training.runs import load_run

    run = load_run(args.run, step=args.step)
    result = run.evaluate(split=args.split, dataset=args.dataset, batch_size=args.batch_size,
                          data_dir=args.data_dir, manual_dir=args.manual_dir)
    name = args.dataset or run.config.data.dataset
    print(json.dumps({"run": str(args.run), "dataset": name, "split": args.split, **result}))
    return 0


def _run_visualize(args) -> int:
    from cnnjax.visualize import ActMaxConfig, visualize_run

    path = visualize_run(args.run, images=args.images, layers=args.layer, cam_layer=args.cam_layer,
                         scale=args.scale, seed=args.seed, actmax=ActMaxConfig(steps=args.actmax_steps),
                         recognizer=args.recognizer)
    print(f"wrote {path}")
    return 0


def _run_compare(args) -> int:
    from cnnjax.compare import compare_runs

    print(f"wrote {compare_runs(args.sources, args.out, calibrate=not args.no_calibration)}")
    return 0


def _run_ensemble(args) -> int:
    from cnnjax.training.ensemble import write_ensemble

    summary = write_ensemble(args.study or args.runs, args.out, top_k=args.top,
                             weights=args.weights, method=args.method, logits=args.logits,
                             split=args.split)
    best = summary["best_member"]
    print(f"ensemble of {len(summary['members'])}: {args.split} accuracy "
          f"{summary[args.split]['accuracy']:.4f}, ECE {summary[args.split]['ece']:.4f} (best "
          f"member {best['accuracy']:.4f}, ECE {best['ece']:.4f}); wrote {summary['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnjax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _visualize_parser(sub)
    _sweep_parser(sub)
    _search_parser(sub)
    _compare_parser(sub)
    _ensemble_parser(sub)
    args = parser.parse_args(argv)
    try:
        return {"train": _run_train, "eval": _run_eval, "visualize": _run_visualize,
                "sweep": _run_sweep, "search": _run_search, "compare": _run_compare,
                "ensemble": _run_ensemble}[args.command](args)
    # The user's errors: bad input (ValueError), paths and files (OSError), a missing optional
    # package (ImportError), a diverging run (FloatingPointError), their own code failing
    # (UserCodeError); each already names the fix.
    except (ValueError, OSError, ImportError, FloatingPointError, UserCodeError) as err:
        print(f"cnnjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it
        print(f"cnnjax {args.command}: aborted.", file=sys.stderr)
        return 130
