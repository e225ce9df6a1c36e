"""`compare_runs`: one self-contained HTML page for many runs or a study (`cnnjax compare`).

Reads the runs' JSON files (config, summary, metrics.jsonl); loads each run's best parameters
only for calibration (expected calibration error and reliability diagrams on test, of each run
and of the uniform ensemble of the best few). Writes compare.html, its PNGs and compare.json
(the table's numbers) into the output directory.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from cnnjax.compare import curves, study_plots
from cnnjax.report import logs
from cnnjax.report.plots import save_figure
from cnnjax.training import calibration, runset
from cnnjax.training.ensemble import Ensemble, scores, softmax
from cnnjax.training.runs import Run, load_run
from cnnjax.visualize import html_report as H
from cnnjax.visualize.calibration import reliability_figure

PAGE = "compare.html"
ENSEMBLE_SIZE = 5  # the comparison's ensemble: the uniform average of the best this many
LABEL_KEYS = 4  # differing settings named in a legend entry at most


def default_out(sources: Sequence[pathlib.Path]) -> pathlib.Path:
    """A study's or a directory of runs' compare/ folder; else checkpoints/compare-<time>."""
    if len(sources) == 1 and not runset.is_run(sources[0]):
        return sources[0] / "compare"
    return pathlib.Path("checkpoints") / f"compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _value(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, list):
        return ",".join(_value(x, digits) for x in v)
    return str(v)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part (`optim.learning_rate` -> `learning_rate`) unless two share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def labels(runs: Sequence[runset.RunRecord], keys: Sequence[str], study: bool) -> list[str]:
    """A legend name per run: its differing settings (at most LABEL_KEYS), a trial's number first."""
    short = _short_names(keys)
    out = []
    for r in runs:
        flat = r.flat
        parts = [f"{short[k]}={_value(flat.get(k, runset.UNSET), 3)}" for k in keys[:LABEL_KEYS]]
        text = ", ".join(parts) or r.name
        out.append(f"{r.name}: {text}" if study or not parts else text)
    return out


def _load(runs: Sequence[runset.RunRecord]) -> tuple[list[Run | None], list[str]]:
    loaded, notes = [], []
    for r in runs:
        try:
            loaded.append(load_run(r.run_dir))
        except (OSError, ValueError) as err:  # no checkpoint (a metrics-only directory), damage
            loaded.append(None)
            notes.append(f"{r.name}: not loaded ({err})")
    return loaded, notes


def _calibration(out: pathlib.Path, runs, loaded) -> tuple[str, dict[str, Any]]:
    """Each loadable run's test ECE, and the best run against the uniform ensemble of the best
    ENSEMBLE_SIZE loadable runs (when they share the data spec), on test."""
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # run index -> (logits, labels)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, run in enumerate(loaded):
        if run is None:
            continue
        data = run.config.data
        key = json.dumps([data.dataset, list(data.classes), data.label, list(data.image_size)])
        if key not in splits:  # runs of one dataset read its test split once
            splits[key] = Ensemble((run,), np.ones(1)).load_split("test")
        images, labels = splits[key]
        found[i] = (run.logits(images), labels)
    if not found:
        return H.note("No run could be loaded (no checkpoints): no calibration figures."), {}
    tables = {i: calibration.reliability(softmax(l), y) for i, (l, y) in found.items()}
    numbers = {"calibration": {runs[i].name: t.to_json() for i, t in tables.items()}}
    best = min(found)  # the best-ranked run that loaded
    members = sorted(found)[:ENSEMBLE_SIZE]
    shown = {f"best run ({runs[best].name})": tables[best]}
    body = ""
    if len(members) > 1:
        try:
            ensemble = Ensemble(tuple(loaded[i] for i in members), np.ones(len(members)))
        except ValueError as err:
            body += H.note(f"No ensemble: {err}")
        else:
            labels_ = found[members[0]][1]
            probabilities = ensemble.combined(np.stack([found[i][0] for i in members]))
            scored = scores(probabilities, labels_)
            table = calibration.reliability(probabilities, labels_)
            shown[f"ensemble of the best {len(members)}"] = table
            single = scores(softmax(found[best][0]), labels_)
            numbers["ensemble"] = {"members": [runs[i].name for i in members],
                                   "test": {k: v for k, v in scored.items() if k != "confusion"},
                                   "best_run_test": {k: v for k, v in single.items()
                                                     if k != "confusion"},
                                   "reliability": table.to_json()}
            body += H.table(["model", "test accuracy", "test loss (NLL)", "test ECE"], [
                (f"best run: {runs[best].name}", single["accuracy"], single["loss"], single["ece"]),
                (f"uniform ensemble of the best {len(members)} (probabilities averaged)",
                 scored["accuracy"], scored["loss"], scored["ece"])])
            body += H.note(f"Members: {', '.join(runs[i].name for i in members)}. The best are "
                           f"chosen by validation, never by test. `cnnjax ensemble` weighs "
                           f"them by validation loss or selects them greedily "
                           f"(Caruana et al., 2004).")
    path = save_figure(reliability_figure(shown), out / "reliability.png")
    body += H.figure(path, "reliability diagram on test: accuracy against confidence per bin "
                           f"({calibration.BINS} equal-width bins); a point below the diagonal "
                           f"is a bin more confident than right")
    return body, numbers


def compare_runs(sources: Sequence[pathlib.Path | str] | pathlib.Path | str,
                 out: pathlib.Path | str | None = None, calibrate: bool = True) -> pathlib.Path:
    """Writes the comparison of `sources` (run directories, directories of runs, or one study)
    to `out` (default `default_out`) and returns the page's path. `calibrate=False` reads JSON
    only (no parameters loaded, no calibration section)."""
    if isinstance(sources, (str, pathlib.Path)):
        sources = [sources]
    sources = [pathlib.Path(s) for s in sources]
    rs = runset.collect(sources)
    out = pathlib.Path(out) if out is not None else default_out(sources)
    out.mkdir(parents=True, exist_ok=True)
    runs, study = list(rs.records), rs.study
    keys = runset.differing_keys(runs)
    names = labels(runs, keys, study is not None)
    loaded, load_notes = _load(runs) if calibrate else ([None] * len(runs), [])

    calibration_body, numbers = (_calibration(out, runs, loaded) if calibrate
                                 else ("", {}))
    eces = {name: t["ece"] for name, t in numbers.get("calibration", {}).items()}
    short = _short_names(keys)
    header = ["rank", "run", *(short[k] for k in keys), "best epoch", "val loss",
              "val accuracy", "test loss", "test accuracy", "test ECE", "wall time (s)",
              "images/s"]
    rows, table_json = [], []
    for rank, r in enumerate(runs, start=1):
        s, flat = r.summary, r.flat
        row = {"rank": rank, "run": r.name, "run_dir": str(r.run_dir),
               "settings": {k: flat.get(k, runset.UNSET) for k in keys},
               "best_epoch": s.get("best_epoch"), "val_loss": s["val"]["loss"],
               "val_accuracy": s["val"]["accuracy"], "test_loss": s["test"]["loss"],
               "test_accuracy": s["test"]["accuracy"], "test_ece": eces.get(r.name),
               "wall_time_s": s.get("wall_time_s"), "train_images_per_s": s.get("train_images_per_s")}
        table_json.append(row)
        rows.append((rank, r.name, *(_value(flat.get(k, runset.UNSET)) for k in keys),
                     row["best_epoch"], row["val_loss"], row["val_accuracy"], row["test_loss"],
                     row["test_accuracy"], "n/a" if row["test_ece"] is None else row["test_ece"],
                     row["wall_time_s"] or "n/a", row["train_images_per_s"] or "n/a"))
    test = np.array([r.summary["test"]["accuracy"] for r in runs])
    sections = [("runs", "Runs", H.note(
        f"Test accuracy {test.mean():.4f} ± {test.std(ddof=1) if len(test) > 1 else 0.0:.4f} "
        f"(mean ± sample std), from {test.min():.4f} to {test.max():.4f}. "
        f"{len(runs)} runs, best first by {rs.monitor} "
        f"({'the study objective' if study else 'each on its own validation split'}); "
        f"the columns after the run's name are the settings in which the runs differ; "
        f"{runset.UNSET} marks a model argument the run leaves at the model's own default.")
        + H.table(header, rows))]

    best = runs[0]
    diffs = ""
    for r in runs[1:]:
        d = runset.config_diff(best, r)
        diffs += H.details(f"{r.name}: {len(d)} setting{' differs' if len(d) == 1 else 's differ'}",
                           H.table(["setting", f"best ({best.name})", r.name],
                                   [(k, _value(a), _value(b)) for k, a, b in d])
                           if d else H.note("Same settings as the best."), open_=len(runs) <= 6)
    sections.append(("diff", "Settings against the best",
                     H.note(f"Each run's config against the best run's ({best.name}), only the "
                            f"keys that differ.") + (diffs or H.note("Only one run."))))

    figures = curves.curve_figures(out, runs, names)
    sections.append(("curves", "Learning curves", H.note(
        "Best run darkest and thickest; a star marks each run's best epoch (the checkpoint its "
        "test figures come from). Legend: the settings in which the runs differ.")
        + "".join(H.figure(p, p.stem.replace("curves_", "").replace("_", " "), width=760)
                  for p in figures)))
    if calibrate:
        sections.append(("calibration", "Calibration and ensemble", calibration_body
                         + "".join(H.note(n) for n in load_notes)))
    record = {"sources": [str(s) for s in sources], "monitor": rs.monitor,
              "differing_keys": keys, "runs": table_json, **numbers}
    if study is not None:
        study_sections, record["study"] = _study_sections(out, study, rs)
        sections += study_sections
    logs.write_json(out / "compare.json", record)
    what = f"study {study.name}" if study else f"{len(runs)} runs"
    intro = H.note(f"Written by `cnnjax compare {' '.join(map(str, sources))}`; "
                   f"PNGs and compare.json beside this page in {out.resolve()}.")
    path = out / PAGE
    path.write_text(H.page(f"cnnjax comparison: {what}", sections, intro), encoding="utf-8")
    return path


def _study_sections(out: pathlib.Path, study: runset.Study, rs: runset.RunSet
                    ) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
    ostudy, dists, left_out = study_plots.optuna_study(study)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state] = states.get(t.state, 0) + 1
    imp = study_plots.importances(ostudy)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
    notes = "".join(H.note(n) for n in [*left_out, *rs.skipped])
    sections = [("history", "Optimization history", H.note(
        f"{len(study.trials)} trials ({counts}); objective {study.monitor}, "
        f"{study.direction}d.") + H.figure(study_plots.history_figure(
            study, out / "study_history.png"), "each trial's value and the best so far") + notes)]
    if imp:
        sections.append(("importance", "Parameter importances", H.note(
            "fANOVA (Hutter et al., 2014) through Optuna's FanovaImportanceEvaluator (seed 0): "
            "the share of the objective's variance over the complete trials each parameter "
            "explains. With few trials it is a rough guide.")
            + H.figure(study_plots.importance_figure(imp, out / "study_importance.png"),
                       "parameter importances")))
    else:
        sections.append(("importance", "Parameter importances",
                         H.note("Too few complete trials, or no parameter varies.")))
    if dists:
        sections.append(("parallel", "Parallel coordinates", H.figure(
            study_plots.parallel_figure(study, dists, out / "study_parallel.png"),
            "one line per complete trial; log axes for log-scale parameters")))
        sections.append(("slices", "Slices", H.figure(
            study_plots.slice_figure(study, dists, out / "study_slices.png"),
            "the objective against each parameter, coloured by trial number")))
    return sections, {"name": study.name, "direction": study.direction, "states": states,
                      "importances": imp,
                      "best": {"number": study.ranked()[0].number, "value": study.ranked()[0].value,
                               "params": study.ranked()[0].params} if study.ranked() else None}
