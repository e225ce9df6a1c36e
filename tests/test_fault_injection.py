"""Fault injection: `cnnjax train` SIGKILLed at seeded random moments of its life (start-up,
mid-epoch, during an asynchronous checkpoint save, at the end while plots and summary.json are
written), sometimes its resume killed too; each run then resumed with `cnnjax train --resume`
must write the uninterrupted run's metrics.jsonl byte for byte and a whole summary.json
(tests/faultkit.py); the same run streamed through grain, killed mid-epoch, resumes to the same
bytes. A 'vmap' sweep and a search worker the same way, each member's and each trial's
metrics.jsonl checked against the uninterrupted sweep's and study's. Then `cnnjax compare` and
`cnnjax ensemble` meet a set holding a killed (unfinished) run and damaged ones: each is skipped
with a line or refused in one, never a traceback.

    python -m pytest -q -n 0 -m faults -s tests/test_fault_injection.py   # prints what each kill hit
    CNNJAX_FAULT_ROUNDS=4 python -m pytest ...                              # 4 times the kills
"""

import json
import os
import pathlib
import random
import shutil
import sys

import pytest

import faultkit
from cnnjax import Config, train_and_evaluate
from cnnjax.cli import main
from faultkit import cli_many, finishing, kill_and_resume, mid_log, one_error_line, saving, startup

pytestmark = pytest.mark.faults

# Two classes, 19 steps an epoch, dropout on (its draws must replay), a checkpoint every 10
# steps and at each epoch's end, the last 3 kept (older ones deleted as the run goes).
CFG = ["model.kwargs.features=4", "model.kwargs.dense=8", "model.kwargs.dropout=0.5",
       "data.classes=0,1", "train.epochs=2", "train.batch_size=32", "train.progress=false",
       "train.log_every=5", "train.checkpoint_every_steps=10"]
SEED = 29  # of the kill moments


def train(out):
    return [sys.executable, "-m", "cnnjax", "train", "--quiet", "--run-dir", str(out),
            *[arg for item in CFG for arg in ("--set", item)]]


def resume(out):
    """`cnnjax train --resume`; a run killed before it wrote config.json has nothing to resume
    from, and its user runs the same command again."""
    if not (out / "config.json").exists():
        return train(out)
    return [sys.executable, "-m", "cnnjax", "train", "--quiet", "--resume", str(out)]


def probe(out) -> str:
    """Where the run was when the kill landed, as its directory shows it."""
    if (out / "summary.json").exists():
        return "summary.json written"
    if list(out.glob("*.png")):
        return "writing plots"
    if list((out / "ckpt").glob("*.orbax-checkpoint-tmp*")):
        return "saving a checkpoint"
    if (out / "metrics.jsonl").exists():
        return f"training ({faultkit.count_lines(out / 'metrics.jsonl')} log lines)"
    return "starting up"


def run_here(argv: list[str]) -> None:
    """The uninterrupted reference of a `python -m cnnjax ...` command line, run by the command's
    own entry point in this process (what the command does, without another interpreter)."""
    assert argv[:3] == [sys.executable, "-m", "cnnjax"], argv
    assert main(argv[3:]) == 0, argv


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, trained in this process (the same code as the command's)."""
    path = tmp_path_factory.mktemp("fi") / "whole"
    train_and_evaluate(Config().override(CFG), path)
    return path


def test_sigkill_at_random_moments_then_resume_replays_the_run(reference, tmp_path):
    lines = faultkit.count_lines(reference / "metrics.jsonl")
    rng = random.Random(SEED)
    # the first kill of a trial hits the run, the next one its resume; a last resume runs on.
    # CNNJAX_FAULT_ROUNDS=N repeats the pattern with fresh draws, for a longer soak.
    trials = [trial for _ in range(int(os.environ.get("CNNJAX_FAULT_ROUNDS", "1"))) for trial in (
        [startup(rng), mid_log(rng, "metrics.jsonl", lines - 1)],
        [saving(), finishing(rng)])]
    outcomes = kill_and_resume(train, resume, trials, reference, tmp_path,
                               compare=["metrics.jsonl"], complete=["summary.json"], probe=probe)
    whole = json.loads((reference / "summary.json").read_text())
    for outcome in outcomes:
        summary = json.loads((tmp_path / f"trial-{outcome.trial}" / "summary.json").read_text())
        for key in ("best_step", "steps", "val", "test"):
            assert summary[key] == whole[key], (outcome, key)
        print(f"trial {outcome.trial}: " + "; ".join(
            f"{m} -> {d}" for m, d in zip(outcome.moments, outcome.during)))
    kills = [d for o in outcomes for d in o.during]
    assert sum(d == "saving a checkpoint" for d in kills) >= 1, kills


def test_sigkill_a_streamed_run_mid_epoch_then_resume_replays_it(reference, tmp_path):
    """The same run streamed through grain (`data.stream=on`, read in the main process) SIGKILLed
    mid-epoch after a checkpoint, then resumed from the grain iterator state that checkpoint
    holds: metrics.jsonl is the uninterrupted in-memory run's, byte for byte."""
    streamed = ["--set", "data.stream=on", "--set", "data.workers=0"]
    lines = faultkit.count_lines(reference / "metrics.jsonl")
    draws = random.Random(SEED + 3)
    after = draws.randint(3, lines - 1)  # step 15 or later: the step-10 checkpoint is there
    delay = draws.uniform(0.0, 0.05)
    moment = faultkit.Moment(f"after line {after} of metrics.jsonl (+{delay * 1000:.0f}ms)",
                             lambda out: faultkit.count_lines(out / "metrics.jsonl") >= after,
                             delay)
    outcome, = kill_and_resume(lambda out: train(out) + streamed, resume, [[moment]], reference,
                               tmp_path, compare=["metrics.jsonl"], complete=["summary.json"],
                               probe=probe)
    assert outcome.landed == [True], outcome
    summary = json.loads((tmp_path / "trial-0" / "summary.json").read_text())
    assert summary["data"] == {"streamed": True, "workers": 0}
    print(f"streamed: {outcome.moments[0]} -> {outcome.during[0]}")


GRID = ["--grid", "optim.learning_rate=[0.001,0.003]", "--lowering", "vmap"]
MEMBERS = ("learning_rate=0.001,seed=0", "learning_rate=0.003,seed=0")


def sweep(out):
    return [sys.executable, "-m", "cnnjax", "sweep", "--quiet", "--out", str(out), *GRID,
            *[arg for item in CFG for arg in ("--set", item)]]


def test_sigkill_a_sweep_at_random_moments_then_rerun_replays_every_member(tmp_path):
    """A two-member 'vmap' sweep (one program) SIGKILLed mid-epoch, during a save and at the
    end, then the same command run again: every member's metrics.jsonl is the uninterrupted
    sweep's."""
    whole = tmp_path / "whole"
    run_here(sweep(whole))
    lines = faultkit.count_lines(whole / MEMBERS[0] / "metrics.jsonl")
    rng = random.Random(SEED + 1)
    trials = [[mid_log(rng, f"{MEMBERS[1]}/metrics.jsonl", lines - 1), saving(),
               finishing(rng, first="*/*.png")]]
    outcomes = kill_and_resume(sweep, sweep, trials, whole, tmp_path,
                               compare=[f"{m}/metrics.jsonl" for m in MEMBERS],
                               complete=["sweep.json", *[f"{m}/summary.json" for m in MEMBERS]])
    assert all(all(o.landed) for o in outcomes), outcomes


SPACE = {"optim.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
         "augment.rotate": {"low": 0, "high": 10}}


def test_sigkill_a_search_worker_at_random_moments_then_rerun_fills_the_same_study(tmp_path):
    """A two-trial study whose worker is SIGKILLed before trial 0's first checkpoint, then (each
    time the same command run again) mid-trial, during a save and at a trial's end: its trials
    are the uninterrupted study's, with the same values and best trial, and each trial's run
    (continued in a new trial's directory, afresh or from its checkpoint) wrote the uninterrupted
    bytes."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))

    def search(out):
        return [sys.executable, "-m", "cnnjax", "search", "--space", str(space), "--trials", "2",
                "--study", str(out), "--pruner", "none",
                *[arg for item in CFG for arg in ("--set", item)]]

    def checkpointed(out) -> str:
        runs = [p for p in (out / "trials").iterdir() if not (p / "summary.json").exists()]
        return "a trial with a checkpoint" if any(
            p.name.isdigit() for r in runs if (r / "ckpt").is_dir()
            for p in (r / "ckpt").iterdir()) else "a trial without a checkpoint"

    whole = tmp_path / "whole"
    run_here(search(whole))
    lines = faultkit.count_lines(whole / "trials" / "0" / "metrics.jsonl")
    rng = random.Random(SEED + 2)
    n = rng.randint(lines // 2, lines - 1)
    trials = [[startup(rng, first="trials/0/config.json", within=0.3),
               faultkit.Moment(f"after line {n} of a trial's metrics.jsonl", lambda out: any(
                   faultkit.count_lines(p) >= n for p in out.glob("trials/*/metrics.jsonl"))),
               saving(), finishing(rng, first="trials/*/*.png")]]
    outcome, = kill_and_resume(search, search, trials, whole, tmp_path, compare=[],
                               complete=["study.json"], probe=checkpointed)
    assert all(outcome.landed), outcome
    assert outcome.during[0] == "a trial without a checkpoint", outcome
    assert "a trial with a checkpoint" in outcome.during[1:], outcome

    out = tmp_path / "trial-0"
    got, want = (json.loads((d / "study.json").read_text()) for d in (out, whole))
    assert got["best"]["params"] == want["best"]["params"]
    assert got["best"]["value"] == want["best"]["value"]
    got, want = ([t for t in d["trials"] if "continued_by" not in t] for d in (got, want))
    assert [(t["state"], t["params"], t["value"]) for t in got] == \
        [(t["state"], t["params"], t["value"]) for t in want]
    for t, w in zip(got, want):
        assert (out / t["run_dir"] / "metrics.jsonl").read_bytes() == \
            (whole / w["run_dir"] / "metrics.jsonl").read_bytes(), t


def test_sigkill_while_an_image_folder_is_prepared_then_rerun(tmp_path):
    """A run on `imagefolder:` killed while the folder is being prepared, its rerun killed there
    too: the third start prepares it whole and trains to the bytes of a run never stopped."""
    import numpy as np
    from PIL import Image

    rng, folder = np.random.default_rng(0), tmp_path / "folder"
    for label, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(48):
            pixels = rng.integers(0, 256, (8, 8, 3), np.uint8)
            pixels[..., label] = 255  # a class the model can tell
            Image.fromarray(pixels).save(folder / name / f"{i:02d}.png")

    def command(out):
        flags = [a for item in CFG if not item.startswith("data.") for a in ("--set", item)]
        return [sys.executable, "-m", "cnnjax", "train", "--quiet", "--run-dir", str(out),
                "--dataset", f"imagefolder:{folder}", "--data-dir", f"{out}-data", *flags]

    def preparing(rng):
        delay = rng.uniform(0.0, 0.3)
        return faultkit.Moment(f"preparing the folder (+{delay:.2f}s)", lambda out: any(
            pathlib.Path(f"{out}-data").glob("cnnjax_imagefolder/*")), delay)

    reference = tmp_path / "whole"
    run_here(command(reference))
    draws = random.Random(SEED)
    outcome, = kill_and_resume(command, lambda out: resume(out) if (out / "config.json").exists()
                               else command(out), [[preparing(draws), preparing(draws)]],
                               reference, tmp_path, complete=["summary.json"], probe=lambda out: (
                                   "after the data" if (out / "config.json").exists()
                                   else "preparing the data"))
    print(f"image folder: " + "; ".join(f"{m} -> {d}" for m, d in zip(outcome.moments,
                                                                      outcome.during)))


def _damage(runs, tmp_path):
    """A set of runs as a crash and a careless hand leave them: two finished, one killed before
    its end (no summary.json), one whose summary.json was cut short, one whose best checkpoint
    lost a byte."""
    root = tmp_path / "set"
    for name in ("a", "b", "cut_summary", "flipped"):
        shutil.copytree(runs, root / name)
    shutil.copytree(runs, root / "killed", ignore=shutil.ignore_patterns("summary.json", "*.png"))
    summary = root / "cut_summary" / "summary.json"
    summary.write_text(summary.read_text()[:50])
    best = json.loads((runs / "summary.json").read_text())["best_step"]
    files = sorted(p for p in (root / "flipped" / "ckpt" / str(best) / "state").rglob("*")
                   if p.is_file() and p.parent.name == "d")
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[-1].write_bytes(bytes(data))
    return root


def test_compare_and_ensemble_skip_or_refuse_broken_runs_in_one_line(reference, tmp_path):
    root = _damage(reference, tmp_path)
    out = tmp_path / "out"
    cases = {
        "compare a directory": ["compare", str(root), "--out", str(out / "c1")],
        "compare the killed run": ["compare", str(root / "a"), str(root / "killed"),
                                   "--no-calibration", "--out", str(out / "c2")],
        "compare a cut summary": ["compare", str(root / "a"), str(root / "cut_summary"),
                                  "--no-calibration", "--out", str(out / "c3")],
        "ensemble a directory": ["ensemble", "--runs", str(root), "--out", str(out / "e1")],
        "ensemble the killed run": ["ensemble", "--runs", str(root / "a"), str(root / "killed"),
                                    "--out", str(out / "e2")],
        "ensemble a flipped bit": ["ensemble", "--runs", str(root / "a"), str(root / "flipped"),
                                   "--out", str(out / "e3")],
    }
    results = dict(zip(cases, cli_many(list(cases.values()))))
    killed, cut = root / "killed", root / "cut_summary" / "summary.json"
    unfinished = f"{killed} is an unfinished run (no summary.json yet: stopped or killed before " \
                 f"its end); finish it with cnnjax train --resume {killed}, or leave it out."
    for name in ("compare a directory", "ensemble a directory"):  # the broken two skipped
        out_lines = results[name].out.splitlines()
        assert "Traceback" not in results[name].out, results[name].out[-3000:]
        assert sum(f"RuntimeWarning: skipped: {unfinished}" in line for line in out_lines) == 1
        assert sum(f"RuntimeWarning: skipped: {cut} is not valid JSON" in line
                   for line in out_lines) == 1, results[name].out
    assert results["compare a directory"].rc == 0
    assert (out / "c1" / "compare.html").exists()
    compared = json.loads((out / "c1" / "compare.json").read_text())
    assert sorted(r["run"] for r in compared["runs"]) == ["a", "b", "flipped"]
    expected = {  # a broken run named itself: refused in one line naming it and the way out
        "compare the killed run": f"error: {unfinished}",
        "ensemble the killed run": f"error: {unfinished}",
        "compare a cut summary": f"error: {cut} is not valid JSON",
        "ensemble a directory": f"error: ensemble member {root / 'flipped'} cannot be loaded: "
                                f"checkpoint {root / 'flipped' / 'ckpt'}",
        "ensemble a flipped bit": f"error: ensemble member {root / 'flipped'} cannot be loaded: "
                                  f"checkpoint {root / 'flipped' / 'ckpt'}",
    }
    for name, message in expected.items():
        assert message in one_error_line(results[name]), (name, results[name].out[-3000:])
    assert "Leave it out of the ensemble" in results["ensemble a flipped bit"].out
