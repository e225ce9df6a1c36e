"""A study's figures: optimization history, parameter importances, parallel coordinates and
slices. Optuna computes (an in-memory study rebuilt from study.json, its fANOVA importance
evaluator); the figures are drawn here with matplotlib's object API, since Optuna's matplotlib
backend imports pyplot and would switch a notebook's backend."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np
from matplotlib import colormaps

from cnnjax.report.plots import new_figure, save_figure
from cnnjax.training.runset import Study, Trial


def _distribution(name: str, spec: dict[str, Any] | None, values: list):
    """The Optuna distribution of a parameter: from study.json's space entry ({"choices": [...]}
    or {"low", "high", "log", "step"}, integers when both bounds and every value are), or, for
    a parameter the space does not list, from the values the trials took."""
    import optuna.distributions as D

    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if spec is None:
        if numbers and values:
            return D.FloatDistribution(float(min(values)), float(max(values)))
        return D.CategoricalDistribution(sorted(set(map(str, values))) if not numbers else
                                         sorted(set(values)))
    if "choices" in spec:
        return D.CategoricalDistribution(list(spec["choices"]))
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log")), spec.get("step")
    kind = spec.get("type")
    integral = kind == "int" or (kind is None and all(
        type(v) is int for v in (low, high, *values)) and (step is None or type(step) is int))
    if integral:
        return D.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return D.FloatDistribution(float(low), float(high), log=log,
                               step=None if log or step is None else float(step))


def distributions(study: Study) -> dict[str, Any]:
    names = list(dict.fromkeys([*study.space, *(k for t in study.trials for k in t.params)]))
    return {n: _distribution(n, study.space.get(n),
                             [t.params[n] for t in study.trials if n in t.params]) for n in names}


def optuna_study(study: Study):
    """An in-memory Optuna study holding the complete trials (those with a value) of study.json,
    and the trials left out with why (a parameter outside its distribution)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(study)
    out = optuna.create_study(direction=study.direction, study_name=study.name)
    left_out = []
    for t in study.trials:
        if t.state != "COMPLETE" or t.value is None:
            continue
        try:
            out.add_trial(optuna.trial.create_trial(
                params=t.params, distributions={k: dists[k] for k in t.params}, value=t.value))
        except ValueError as err:
            left_out.append(f"trial {t.number}: {err}")
    return out, dists, left_out


def importances(ostudy) -> dict[str, float]:
    """fANOVA importances (Hutter et al., 2014), seeded; empty when fewer than two complete trials
    or no parameter varies."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = ostudy.get_trials(deepcopy=False)
    if len(done) < 2:
        return {}
    try:
        return dict(get_param_importances(ostudy, evaluator=FanovaImportanceEvaluator(seed=0)))
    except (ValueError, RuntimeError):
        return {}


def _complete(study: Study) -> list[Trial]:
    return [t for t in study.trials if t.state == "COMPLETE" and t.value is not None]


def history_figure(study: Study, path: pathlib.Path) -> pathlib.Path:
    fig, ax = new_figure(figsize=(7, 4))
    done = _complete(study)
    ax.plot([t.number for t in done], [t.value for t in done], "o", ms=4, color="C0",
            label="complete trial")
    pruned = [t for t in study.trials if t.state == "PRUNED" and t.value is not None]
    if pruned:
        ax.plot([t.number for t in pruned], [t.value for t in pruned], "x", ms=4, color="0.5",
                label="pruned (last reported)")
    best, xs, ys = None, [], []
    better = min if study.direction == "minimize" else max
    for t in sorted(done, key=lambda t: t.number):
        best = t.value if best is None else better(best, t.value)
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=study.monitor, title=f"Optimization history ({study.direction})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if study.monitor.endswith("loss") and done and min(t.value for t in done) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def importance_figure(values: dict[str, float], path: pathlib.Path) -> pathlib.Path:
    fig, ax = new_figure(figsize=(6.5, 0.5 + 0.45 * max(1, len(values))))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="C0")
    for y, n in enumerate(names):
        ax.text(values[n], y, f" {values[n]:.2f}", va="center", fontsize=8)
    ax.set(xlabel="importance (fANOVA, share of the objective's variance)",
           title="Parameter importances", xlim=(0, 1.1 * max(values.values(), default=1)))
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def _axis_position(dist, values: list) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Values mapped onto [0, 1] along a parameter's axis (log for a log distribution, category
    index for a categorical one) and the (position, label) ticks to write."""
    import optuna.distributions as D

    if isinstance(dist, D.CategoricalDistribution):
        choices = [repr(c) if isinstance(c, str) else str(c) for c in dist.choices]
        index = {c: i for i, c in enumerate(dist.choices)}
        span = max(1, len(choices) - 1)
        return (np.array([index[v] / span for v in values]),
                [(i / span, c) for i, c in enumerate(choices)])
    lo, hi = dist.low, dist.high
    f = math.log if dist.log else (lambda v: v)
    width = (f(hi) - f(lo)) or 1.0
    pos = np.array([(f(v) - f(lo)) / width for v in values])
    return pos, [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")]


def parallel_figure(study: Study, dists: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """One line per complete trial through each parameter's axis to the objective's, coloured
    by the objective (dark: best)."""
    done = [t for t in _complete(study) if all(n in t.params for n in dists)]
    names = list(dists)
    fig, ax = new_figure(figsize=(max(6.0, 1.8 * (len(names) + 1)), 4.4))
    values = np.array([t.value for t in done])
    if not len(done):
        ax.set(title="Parallel coordinates: no complete trial sets every parameter")
        return save_figure(fig, path)
    lo, hi = values.min(), values.max()
    objective = (values - lo) / ((hi - lo) or 1.0)
    goodness = objective if study.direction == "minimize" else 1 - objective
    columns, ticks = [], []
    for n in names:
        pos, t = _axis_position(dists[n], [tr.params[n] for tr in done])
        columns.append(pos)
        ticks.append(t)
    columns.append(objective)
    ticks.append([(0.0, f"{lo:.4g}"), (1.0, f"{hi:.4g}")])
    data = np.stack(columns, axis=1)
    cmap = colormaps["viridis"]
    for row, g in sorted(zip(data, goodness), key=lambda rg: -rg[1]):  # best drawn last, on top
        ax.plot(range(len(columns)), row, color=cmap(0.85 * g), lw=1.2, alpha=0.85)
    for x, axis_ticks in enumerate(ticks):
        ax.axvline(x, color="0.3", lw=0.8)
        for y, label in axis_ticks:
            ax.text(x + 0.03, y, label, fontsize=7, va="center",
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
    ax.set_xticks(range(len(columns)), [*names, study.monitor], fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set(xlim=(-0.2, len(columns) - 0.5), ylim=(-0.05, 1.05),
           title="Parallel coordinates (colour: objective, dark = best)")
    return save_figure(fig, path)


def slice_figure(study: Study, dists: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """The objective against each parameter, coloured by trial number."""
    import optuna.distributions as D

    names = list(dists)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(max(1, len(names)) / cols)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    done, points = _complete(study), None
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        n = names[k]
        trials = [t for t in done if n in t.params]
        dist = dists[n]
        if isinstance(dist, D.CategoricalDistribution):
            index = {c: i for i, c in enumerate(dist.choices)}
            xs = [index[t.params[n]] for t in trials]
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices], fontsize=7)
        else:
            xs = [t.params[n] for t in trials]
            if dist.log:
                ax.set_xscale("log")
        points = ax.scatter(xs, [t.value for t in trials], c=[t.number for t in trials],
                            cmap="plasma", s=18, edgecolors="black", linewidths=0.3)
        ax.set(xlabel=n, ylabel=study.monitor if k % cols == 0 else "")
        ax.grid(alpha=0.3)
    if points is not None:
        fig.colorbar(points, ax=list(axes.flat), label="trial", fraction=0.03)
    fig.suptitle("Slices: the objective against each parameter")
    fig.savefig(path, dpi=110)
    return path
