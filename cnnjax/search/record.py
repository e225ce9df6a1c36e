"""What a study leaves behind: `study.json` and the table printed at the end and by `--show`.

study.json is written from the storage after every trial (atomically: a reader never sees half a
file) and holds the best trial (parameters, value, run directory) and every trial's state,
parameters, value, test figures, epochs and wall time; `cnnjax compare` and `cnnjax ensemble`
read it (cnnjax/training/runset.py). Trials that a crashed worker left and that another one
continued show as failed with the trial that took them over; proposals beyond `--trials` that a
worker drew while another filled the study are left out.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from cnnjax.training.runset import STUDY_FILE

# user attrs a worker sets on a trial
RUN_DIR, HOST, WORKER = "run_dir", "host", "worker"
SURPLUS, FAILED_REASON, PRUNED_AT = "surplus", "failed_reason", "pruned_at_epoch"
SEARCH_ATTR = "cnnjax_search"  # the study's user attr: space, fixed config, sampler, pruner, seed


def retried(trials: list[FrozenTrial]) -> dict[int, int]:
    """{number of a trial a dead worker left: number of the trial that continued it}."""
    out = {}
    for t in trials:
        for old in t.system_attrs.get("retry_history", []):
            out[int(old)] = t.number
    return out


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The study's trials proper, in number order: all but surplus proposals and trials a dead
    worker left (their continuation counts instead)."""
    again = retried(trials)
    return [t for t in trials if t.number not in again and not t.user_attrs.get(SURPLUS)]


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials with an outcome: complete, pruned, or failed on their own (a diverging run)."""
    return [t for t in counted(trials)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.user_attrs.get(FAILED_REASON))]


def _value(t: FrozenTrial) -> float | None:
    if t.value is not None:
        return t.value
    if t.intermediate_values:  # a pruned trial: its last report
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def best(study: optuna.Study) -> FrozenTrial | None:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None]
    if not done:
        return None
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def trial_record(t: FrozenTrial, study_dir: pathlib.Path, again: dict[int, int]) -> dict[str, Any]:
    run_dir = t.user_attrs.get(RUN_DIR)
    here = run_dir is not None and (study_dir / run_dir).is_dir()
    wall = ((t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None)
    record = {
        "number": t.number, "state": t.state.name, "params": t.params, "value": _value(t),
        "run_dir": run_dir if here else None, "host": t.user_attrs.get(HOST),
        "wall_time_s": t.user_attrs.get("train_seconds", wall), "epochs": t.user_attrs.get("epochs"),
        "best_epoch": t.user_attrs.get("best_epoch"), "test": t.user_attrs.get("test"),
    }
    if t.state == TrialState.PRUNED:
        record["pruned_at_epoch"] = t.user_attrs.get(PRUNED_AT, t.last_step)
    if t.number in again:
        record["continued_by"] = again[t.number]
    if t.user_attrs.get(FAILED_REASON):
        record["failed_reason"] = t.user_attrs[FAILED_REASON]
    if "failed_trial" in t.system_attrs:
        record["continues"] = int(t.system_attrs["retry_history"][-1])
    return record


def study_record(study: optuna.Study, study_dir: pathlib.Path, target: int) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    meta = study.user_attrs.get(SEARCH_ATTR, {})
    top = best(study)
    monitor = meta.get("monitor", "val_loss")
    return {
        "name": study.study_name, "direction": study.direction.name.lower(), "monitor": monitor,
        "objective": f"{monitor} at the best epoch (validation)", "target_trials": target,
        "finished_trials": len(finished(trials)), "space": meta.get("space"),
        "sampler": meta.get("sampler"), "pruner": meta.get("pruner"),
        "study_seed": meta.get("study_seed"),
        "best": None if top is None else trial_record(top, study_dir, again),
        "trials": [trial_record(t, study_dir, again) for t in trials
                   if not t.user_attrs.get(SURPLUS)],
    }


def write_study_json(record: dict[str, Any], study_dir: pathlib.Path) -> pathlib.Path:
    path = study_dir / STUDY_FILE
    tmp = path.with_name(f".{STUDY_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def table(record: dict[str, Any]) -> str:
    """The trials as a text table, best first among the complete ones, then the others."""
    keys = list(dict.fromkeys(k for t in record["trials"] for k in t["params"]))
    rank = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    sign = 1.0 if record["direction"] == "minimize" else -1.0
    rows = sorted(record["trials"], key=lambda t: (
        rank.get(t["state"], 5), sign * t["value"] if t["value"] is not None and
        t["state"] == "COMPLETE" else 0.0, t["number"]))
    head = ["trial", "state", record["monitor"], "test acc", "epochs", "seconds", *keys]
    lines = [head]
    for t in rows:
        state = t["state"].lower()
        if "pruned_at_epoch" in t:
            state = f"pruned@{t['pruned_at_epoch']}"
        if "continued_by" in t:
            state = f"died->{t['continued_by']}"
        test = (t.get("test") or {}).get("accuracy")
        lines.append([str(t["number"]), state, _fmt(t["value"]) if t["value"] is not None else "-",
                      _fmt(test) if test is not None else "-", _fmt(t["epochs"] or "-"),
                      f"{t['wall_time_s']:.0f}" if t["wall_time_s"] else "-",
                      *[_fmt(t["params"][k]) if k in t["params"] else "-" for k in keys]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    best = record["best"]
    tail = (f"best: trial {best['number']}, {record['monitor']} {best['value']:.4f}"
            + (f", run {best['run_dir']}" if best["run_dir"] else "") if best else "best: none yet")
    return "\n".join([f"study {record['name']}: {record['finished_trials']} of "
                      f"{record['target_trials']} trials finished ({record['direction']} "
                      f"{record['monitor']})", *out, tail])
