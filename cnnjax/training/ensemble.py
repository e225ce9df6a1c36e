"""Ensembles of finished runs: several runs evaluated and used as one model.

`load_ensemble(runs | study, top_k=K)` takes the K best runs (by their validation monitor, or a
study's trial values) and returns an `Ensemble`, which predicts and evaluates as a `Run` does.

* Combining: the weighted mean of the members' class probabilities (default), or with
  `logits=True` the softmax of the weighted mean of their logits. An ensemble of one run
  predicts exactly what the run predicts.
* Weights: `"uniform"`, or `"val"`: proportional to 1 / each member's validation loss (its
  summary.json's, on its own validation split), so a member with twice the loss counts half.
* `method="greedy"`: Caruana et al. (2004), "Ensemble Selection from Libraries of Models":
  forward selection with replacement over the top-K pool, each round adding the member that most
  lowers the ensemble's negative log-likelihood on the validation split; the weights are how
  often each was picked, up to the round with the lowest validation NLL. It needs one validation
  split held out from every member: members trained with one seed (a study, a learning-rate
  sweep), not a seed sweep, whose members' validation images are other members' training images.
  Test never takes part in any choice.

Members may differ in model but must share the data spec (dataset, classes, image shape,
normalization); a mismatch is refused naming it. Members of one model (same name, kwargs and
parameter shapes) run as one compiled program: their variables stacked, the model under
`jax.vmap`. `evaluate(split="val")` is the validation split the members share; refused when their
seeds or validation fractions differ, since no image would then be held out from all of them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from cnnjax.data import input_pipeline
from cnnjax.data.input_pipeline import as_nhwc
from cnnjax.data.pixels import normalize
from cnnjax.training import calibration, runset
from cnnjax.training.runs import Run, load_run

WEIGHTS = ("uniform", "val")
METHODS = ("average", "greedy")
GREEDY_ROUNDS = 20


def _spec_fields(run: Run) -> dict[str, Any]:
    """What members must share: the data they read and how their models see it."""
    spec, data = run.spec, run.config.data
    return {"data.dataset": data.dataset, "data.classes": list(data.classes),
            "data.label": data.label, "data.image_size": list(data.image_size),
            "image_shape": list(spec.image_shape), "num_classes": spec.num_classes,
            "mean": np.asarray(spec.mean).tolist(), "std": np.asarray(spec.std).tolist()}


def check_compatible(members: Sequence[Run]) -> None:
    """Refuses members whose data spec differs from the first's, naming each difference."""
    first = _spec_fields(members[0])
    for run in members[1:]:
        other = _spec_fields(run)
        diffs = [f"{k}: {first[k]} vs {other[k]}" for k in first if first[k] != other[k]]
        if diffs:
            raise ValueError(f"ensemble members must share the data spec; {run.run_dir} differs "
                             f"from {members[0].run_dir} in {'; '.join(diffs)}. Ensemble runs "
                             f"trained on the same data.")


def _model_key(run: Run) -> str:
    """Members with equal keys share a model: one compiled program serves them all."""
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), run.variables)
    return json.dumps([run.config.model.name, run.config.model.kwargs,
                       str(jax.tree.structure(run.variables)), jax.tree.leaves(shapes)],
                      sort_keys=True, default=str)


def _stacked_logits(model, mean, std):
    """(stacked variables, images) -> (members, N, classes) logits: the model under vmap over
    the members' variables, the images shared."""

    @jax.jit
    def logits(stacked, images):
        x = normalize(images, mean, std)
        return jax.vmap(lambda v: model.apply(v, x, train=False))(stacked)

    return logits


def softmax(logits) -> np.ndarray:
    """Class probabilities in float64 (SciPy's softmax, computed on the host)."""
    return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def scores(probabilities: np.ndarray, labels: np.ndarray, bins: int = calibration.BINS
           ) -> dict[str, Any]:
    """Loss (negative log-likelihood of the labels), accuracy, count, confusion matrix and
    expected calibration error of (N, C) probabilities."""
    labels = np.asarray(labels, np.int64)
    n, c = probabilities.shape
    picked = probabilities[np.arange(n), labels]
    predicted = probabilities.argmax(-1)
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return {"loss": float(-np.mean(np.log(np.maximum(picked, np.finfo(np.float64).tiny)))),
            "accuracy": float(np.mean(predicted == labels)), "count": int(n),
            "confusion": confusion.tolist(),
            "ece": calibration.expected_calibration_error(probabilities, labels, bins)}


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Runs used as one model: `predict`, `probabilities` and `evaluate` take raw images as a
    `Run`'s do. `weights` sum to 1; `combine` is 'probabilities' or 'logits'; `selection` records
    how the members and weights were chosen."""

    members: tuple[Run, ...]
    weights: np.ndarray
    combine: str = "probabilities"
    selection: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.members:
            raise ValueError("an ensemble needs at least one run.")
        weights = np.asarray(self.weights, np.float64)
        if weights.shape != (len(self.members),) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"ensemble weights must be {len(self.members)} non-negative numbers "
                             f"with a positive sum, got {self.weights}.")
        if self.combine not in ("probabilities", "logits"):
            raise ValueError(f"combine must be 'probabilities' or 'logits', got {self.combine!r}.")
        check_compatible(self.members)
        object.__setattr__(self, "weights", weights / weights.sum())
        groups: dict[str, list[int]] = {}
        for i, run in enumerate(self.members):
            groups.setdefault(_model_key(run), []).append(i)
        programs = []
        for indices in groups.values():
            if len(indices) == 1:  # the run's own compiled function: its exact logits
                programs.append((tuple(indices), None, None))
                continue
            first = self.members[indices[0]]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[self.members[i].variables for i in indices])
            programs.append((tuple(indices), stacked,
                             _stacked_logits(first.model, first.spec.mean, first.spec.std)))
        object.__setattr__(self, "_programs", tuple(programs))

    @property
    def spec(self):
        return self.members[0].spec

    @property
    def config(self):
        """The first member's config (the data settings are every member's)."""
        return self.members[0].config

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """Member indices per compiled program: members of one model share one."""
        return [indices for indices, _, _ in self._programs]

    def member_logits(self, images, batch_size: int = 1000) -> np.ndarray:
        """float32 (members, N, classes) logits of raw images, `batch_size` images x members
        per compiled call at most."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        images = as_nhwc(images, self.spec.image_shape)
        out = np.zeros((len(self.members), len(images), self.spec.num_classes), np.float32)
        for indices, stacked, fn in self._programs:
            rows = max(1, batch_size // len(indices))
            for start in range(0, len(images), rows):
                chunk = images[start:start + rows]
                if fn is None:
                    out[indices[0], start:start + len(chunk)] = self.members[indices[0]].logits(chunk)
                else:
                    out[list(indices), start:start + len(chunk)] = np.asarray(
                        fn(stacked, jnp.asarray(chunk)))
        return out

    def combined(self, member_logits: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """float64 (N, classes) probabilities from (members, N, classes) logits: the weighted
        mean of the members' probabilities, or the softmax of their weighted mean logits."""
        w = self.weights if weights is None else np.asarray(weights, np.float64)
        if self.combine == "logits":
            return softmax(np.einsum("k,knc->nc", w, np.asarray(member_logits, np.float64)))
        return np.einsum("k,knc->nc", w, softmax(member_logits))

    def probabilities(self, images, batch_size: int = 1000) -> np.ndarray:
        return self.combined(self.member_logits(images, batch_size))

    def predict(self, images, batch_size: int = 1000) -> np.ndarray:
        """Raw images -> int class indices (N,)."""
        return self.probabilities(images, batch_size).argmax(-1)

    def load_split(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """A split of the members' dataset with its labels, classes selected as in training;
        'val' is the validation split the members share (refused when they do not share one)."""
        cfg = self.config.data
        if split == "val":
            seeds = {(m.config.train.seed, m.config.data.val_fraction) for m in self.members}
            if len(seeds) > 1:
                raise ValueError(
                    f"the members were trained on different train/validation splits (seed, "
                    f"data.val_fraction: {sorted(seeds)}): each one's validation images are in "
                    f"another's training set, so no validation score of the ensemble is "
                    f"honest. Evaluate on 'test', or ensemble runs trained with one seed.")
            return input_pipeline.load_data(cfg, self.config.train.seed).val
        images, labels = input_pipeline.load_split(cfg, split)
        return input_pipeline.select_classes(images, labels, tuple(cfg.classes))

    def evaluate(self, images=None, labels=None, *, split: str = "test", batch_size: int = 1000,
                 bins: int = calibration.BINS) -> dict[str, Any]:
        """The ensemble's loss (NLL), accuracy, count, confusion matrix and expected calibration
        error on raw `images` and `labels`, or on `split` of the members' dataset; `members`
        holds each member's own figures on the same images."""
        if images is None:
            images, labels = self.load_split(split)
        elif labels is None or len(labels) != len(images):
            raise ValueError(f"Ensemble.evaluate takes images with one label each, got "
                             f"{len(images)} images and {None if labels is None else len(labels)} labels.")
        labels = np.asarray(labels)
        if not len(labels):
            raise ValueError("Ensemble.evaluate needs at least one image.")
        logits = self.member_logits(images, batch_size)
        result = scores(self.combined(logits), labels, bins)
        result["members"] = [{"run_dir": str(m.run_dir), "weight": float(w),
                              **{k: v for k, v in scores(softmax(l), labels, bins).items()
                                 if k != "confusion"}}
                             for m, w, l in zip(self.members, self.weights, logits)]
        return result


def greedy_selection(ensemble: Ensemble, member_logits: np.ndarray, labels: np.ndarray,
                     rounds: int = GREEDY_ROUNDS) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Caruana's forward selection with replacement on validation NLL: (weights over the pool,
    each round's pick and validation NLL). Ties go to the better-ranked (earlier) member; the
    weights are the picks' counts up to the best round (the earliest, if several tie)."""
    if rounds <= 0:
        raise ValueError(f"rounds must be positive, got {rounds}.")
    k = len(ensemble.members)
    counts, history, best = np.zeros(k), [], (np.inf, None)
    for r in range(rounds):
        trial = []
        for j in range(k):
            w = counts.copy()
            w[j] += 1
            trial.append(scores(ensemble.combined(member_logits, w / w.sum()), labels)["loss"])
        j = int(np.argmin(trial))
        counts[j] += 1
        history.append({"round": r + 1, "added": str(ensemble.members[j].run_dir),
                        "val_loss": float(trial[j])})
        if trial[j] < best[0]:
            best = (trial[j], counts.copy())
    return best[1] / best[1].sum(), history


def _records(source) -> runset.RunSet:
    if isinstance(source, (str, pathlib.Path)):
        return runset.collect([source])
    return runset.collect([s.run_dir if isinstance(s, Run) else s for s in source])


def _load_member(run_dir: pathlib.Path) -> Run:
    """A member's best parameters; a run that cannot give them is named with the way out."""
    try:
        return load_run(run_dir)
    except (OSError, ValueError) as err:
        raise type(err)(f"ensemble member {run_dir} cannot be loaded: {err} Leave it out of the "
                        f"ensemble, or train it again.") from None


def load_ensemble(source, top_k: int | None = None, weights: str = "uniform",
                  method: str = "average", logits: bool = False,
                  rounds: int = GREEDY_ROUNDS) -> Ensemble:
    """An `Ensemble` of the `top_k` best runs (all when None) of `source`: a study directory, a
    run directory, a directory of runs, or a list of run directories or `Run`s. Runs rank by
    their validation monitor, a study's trials by their value. `weights`: 'uniform' or 'val'
    (proportional to 1 / validation loss); `method`: 'average' or 'greedy' (Caruana's selection
    on the shared validation split, which sets the weights itself); `logits`: average logits
    instead of probabilities."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "greedy" and weights != "uniform":
        raise ValueError("greedy selection sets the weights itself (how often it picks each "
                         "member); leave weights='uniform'.")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}.")
    runs = _records(source)
    pool = runs.records[:top_k]
    given = {} if isinstance(source, (str, pathlib.Path)) else {
        s.run_dir.resolve(): s for s in source if isinstance(s, Run)}
    members = tuple(given.get(r.run_dir.resolve()) or _load_member(r.run_dir) for r in pool)
    selection = {"method": method, "weights": weights, "top_k": top_k, "monitor": runs.monitor,
                 "ranked": [{"run_dir": str(r.run_dir), "name": r.name,
                             "val_loss": r.summary["val"]["loss"],
                             "val_accuracy": r.summary["val"]["accuracy"]} for r in pool]}
    if runs.study is not None:
        selection["study"] = str(runs.study.path)
    combine = "logits" if logits else "probabilities"
    if weights == "val":
        w = np.array([1.0 / max(r.summary["val"]["loss"], 1e-12) for r in pool])
    else:
        w = np.ones(len(members))
    ensemble = Ensemble(members, w, combine, selection)
    if method == "average":
        return ensemble
    images, labels = ensemble.load_split("val")  # refused when the members share no split
    w, history = greedy_selection(ensemble, ensemble.member_logits(images), labels, rounds)
    keep = np.flatnonzero(w > 0)
    selection = {**selection, "rounds": rounds, "history": history}
    return Ensemble(tuple(members[i] for i in keep), w[keep], combine, selection)


def write_ensemble(source, out: pathlib.Path | str | None = None, *, top_k: int | None = None,
                   weights: str = "uniform", method: str = "average", logits: bool = False,
                   split: str = "test", rounds: int = GREEDY_ROUNDS) -> dict[str, Any]:
    """`cnnjax ensemble`: the ensemble of `source`'s best runs evaluated on `split`, against its
    best-ranked run on the same images; writes ensemble.json (members, weights, how they were
    chosen, figures, the reliability table) and predictions.npz (labels, each member's and the
    ensemble's probabilities) into `out` (default: <study>/ensemble, or
    checkpoints/ensemble-<time>). Returns ensemble.json's content and its `path`."""
    import datetime

    from cnnjax.report.logs import write_json

    ensemble = load_ensemble(source, top_k, weights, method, logits, rounds)
    study = ensemble.selection.get("study")
    if out is None:
        out = (pathlib.Path(study) / "ensemble" if study else pathlib.Path("checkpoints")
               / f"ensemble-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out = pathlib.Path(out)
    images, labels = ensemble.load_split(split)
    member_logits = ensemble.member_logits(images)
    probabilities = ensemble.combined(member_logits)
    result = scores(probabilities, labels)
    top = pathlib.Path(ensemble.selection["ranked"][0]["run_dir"])
    dirs = [m.run_dir.resolve() for m in ensemble.members]
    best_logits = (member_logits[dirs.index(top.resolve())] if top.resolve() in dirs
                   else load_run(top).logits(images))  # greedy may leave the best out
    best = {"run_dir": str(top), **scores(softmax(best_logits), labels)}
    members = [{"run_dir": str(m.run_dir), "weight": float(w),
                **{k: v for k, v in scores(softmax(l), labels).items() if k != "confusion"}}
               for m, w, l in zip(ensemble.members, ensemble.weights, member_logits)]
    summary = {"split": split, "combine": ensemble.combine, "members": members,
               split: result, "best_member": best, "selection": ensemble.selection,
               "reliability": calibration.reliability(probabilities, labels).to_json(),
               "best_member_reliability": calibration.reliability(softmax(best_logits),
                                                                  labels).to_json()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ensemble.json", summary)
    np.savez_compressed(out / "predictions.npz", labels=labels, probabilities=probabilities,
                        member_probabilities=softmax(member_logits),
                        member_run_dirs=np.array([str(m.run_dir) for m in ensemble.members]))
    return {**summary, "path": str(out / "ensemble.json")}
