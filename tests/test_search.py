"""cnnjax search: studies whose trials are runs, that survive crashes and fill from many workers.

References: a trial's value is read back from its own metrics.jsonl (the best epoch's validation
figure); a trial is reproduced by `cnnjax train --config` of its config.json; a study preempted
and continued is compared with one that ran through (SIGKILLed workers: the fault-injection
suite, tests/test_fault_injection.py); concurrent workers, on the embedded journal and on a real
PostgreSQL server, are counted trial by trial.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import optuna
import pytest

from cnnjax import Config
from cnnjax.cli import main
from cnnjax.search import run_search
from cnnjax.search.worker import make_sampler, SearchSettings
from cnnjax.search.space import load_space
from fixtures import postgres_server

SPACE = {"optim.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
         "augment.rotate": {"low": 0, "high": 10},
         "model.kwargs.dropout": {"low": 0.0, "high": 0.5}}  # all sweepable: --batch takes it
FIXED = ["model.kwargs.features=4", "model.kwargs.dense=8", "data.classes=0,1", "train.epochs=2",
         "train.log_every=5", "train.checkpoint_every_steps=5", "train.progress=false"]
FLAGS = [a for item in FIXED for a in ("--set", item)]
N = 3


def fixed() -> Config:
    return Config().override(FIXED)


def cli(*args: str, sets: tuple[str, ...] = (), **kw) -> subprocess.Popen:
    """`cnnjax search ARGS` on the FIXED config, then `sets` (overrides of it)."""
    flags = FLAGS + [a for item in sets for a in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "cnnjax", "search", *args, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


# Workers that share a study are checked for who ran what, not for a trial's figures: one epoch,
# and trials that differ in their seed alone, so every trial runs the one compiled program (the
# persistent compilation cache serves it) where a learning rate would compile its own.
ONE_EPOCH = ("train.epochs=1",)


def study_json(path: pathlib.Path) -> dict:
    return json.loads((path / "study.json").read_text())


def proper(record: dict) -> list[dict]:
    """The study's trials proper, in order: what a dead worker left is replaced by its
    continuation."""
    return [t for t in record["trials"] if "continued_by" not in t]


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "space.json"
    path.write_text(json.dumps(SPACE))
    return path


@pytest.fixture(scope="module")
def seed_space(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "seeds.json"
    path.write_text(json.dumps({"train.seed": {"low": 0, "high": 10**6}}))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, space_file):
    """An uninterrupted one-worker study of N trials (in-process)."""
    path = tmp_path_factory.mktemp("study") / "tiny"
    run_search(fixed(), space_file, N, path, pruner="none", quiet=True)
    return path


def test_every_trial_is_a_run_and_its_value_is_validation_at_the_best_epoch(study):
    record = study_json(study)
    assert record["direction"] == "minimize" and record["monitor"] == "val_loss"
    assert [t["state"] for t in record["trials"]] == ["COMPLETE"] * N
    for t in record["trials"]:
        run = study / t["run_dir"]
        assert t["run_dir"] == f"trials/{t['number']}"
        for name in ("config.json", "metrics.jsonl", "summary.json", "data_spec.json", "loss.png"):
            assert (run / name).is_file(), name
        assert any((run / "tensorboard").iterdir()) and any((run / "ckpt").iterdir())
        epochs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "epoch"' in l]
        best = min(epochs, key=lambda e: e["val_loss"])
        assert t["value"] == pytest.approx(best["val_loss"], rel=1e-6)
        assert t["best_epoch"] == best["epoch"]
        cfg = json.loads((run / "config.json").read_text())
        for key, value in t["params"].items():
            entry = cfg
            for part in key.split("."):
                entry = entry[part]
            assert entry == value
        assert 1e-3 <= t["params"]["optim.learning_rate"] <= 1e-2
        summary = json.loads((run / "summary.json").read_text())
        assert t["test"]["accuracy"] == summary["test"]["accuracy"]  # recorded, not chosen by
    values = [t["value"] for t in record["trials"]]
    assert record["best"]["value"] == min(values)
    assert record["best"]["number"] == values.index(min(values))


def test_a_trial_reproduces_byte_for_byte_from_its_config(study, tmp_path):
    trial = study / "trials" / "1"
    assert main(["train", "--config", str(trial / "config.json"), "--run-dir",
                 str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == \
        (trial / "metrics.jsonl").read_bytes()


def test_a_finished_study_run_again_does_nothing_and_shows_its_table(study, space_file, capsys):
    before = (study / "study.journal").read_bytes()
    run_search(fixed(), space_file, N, study, pruner="none")
    out = capsys.readouterr().out
    assert "nothing to do" in out and "trial" in out
    assert len(study_json(study)["trials"]) == N
    assert main(["search", "--show", str(study)]) == 0
    shown = capsys.readouterr().out
    assert f"{N} of {N} trials finished" in shown and "best: trial" in shown
    assert (study / "study.journal").read_bytes()[:len(before)] == before


def test_the_sampler_is_seeded_by_the_study_seed_and_the_position():
    """Optuna's samplers, made per position: the same position draws the same, another differs."""
    import optuna

    space = load_space(SPACE, fixed())
    settings = SearchSettings(trials=5)

    def draw(seed, position):
        s = SearchSettings(trials=5, study_seed=seed)
        study = optuna.create_study(sampler=make_sampler(s, space, position))
        return space.suggest(study.ask())

    assert draw(0, 3) == draw(0, 3)
    assert draw(0, 3) != draw(0, 4) and draw(0, 3) != draw(1, 3)
    assert settings.sampler == "tpe"


def _wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the worker ended first:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def _has_checkpoint(run: pathlib.Path) -> bool:
    ckpt = run / "ckpt"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def test_a_preempted_worker_checkpoints_its_trial_and_the_study_continues(study, space_file,
                                                                          tmp_path):
    """Ctrl-C once trial 0 has a checkpoint: the worker checkpoints the trial, queues it again
    and exits 130 with the line to continue; the same command run again resumes the trial and
    goes on to the next. The study's trials and their metrics.jsonl are the uninterrupted
    study's first two (each proposal is seeded by its position). (SIGTERM: the batch test
    below.)"""
    path = tmp_path / "tiny"
    args = ["--space", str(space_file), "--trials", "2", "--study", str(path),
            "--pruner", "none"]
    outs = []
    for signum, status in ((signal.SIGINT, 130),):
        seen = {p.name for p in (path / "trials").iterdir()} if path.exists() else set()
        proc = cli(*args)
        _wait_for(lambda: any(_has_checkpoint(p) and not (p / "summary.json").exists()
                              for p in (path / "trials").iterdir() if p.name not in seen)
                  if (path / "trials").is_dir() else False, proc)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == status, out
        assert f"stopped by {signum.name}" in out and "run the same command again" in out
        assert "Traceback" not in out
        outs.append(out)
    last = cli(*args)
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out
    assert out.count("continues trial") == 1 and "resuming" in out

    record, reference = study_json(path), study_json(study)
    got, want = proper(record), proper(reference)[:2]
    assert [t["state"] for t in got] == ["COMPLETE"] * 2
    assert [(t["params"], t["value"]) for t in got] == [(t["params"], t["value"]) for t in want]
    for t, w in zip(got, want):
        assert (path / t["run_dir"] / "metrics.jsonl").read_bytes() == \
            (study / w["run_dir"] / "metrics.jsonl").read_bytes()


@pytest.fixture(scope="module")
def batch_study(tmp_path_factory, space_file):
    """Three trials asked two at a time, each batch one 'vmap' program."""
    path = tmp_path_factory.mktemp("study") / "batched"
    run_search(fixed(), space_file, N, path, pruner="none", batch=2, lowering="vmap", quiet=True)
    return path


def test_a_batch_of_trials_is_one_sweep_whose_members_are_the_trials_runs(batch_study, study):
    """The batched study proposes what a one-at-a-time study proposes (each proposal seeded by its
    position); each trial's run is its batch's member, whose config alone trained by `cnnjax
    train` reaches the trial's value within float rounding; its epochs reach Optuna."""
    got, want = proper(study_json(batch_study)), proper(study_json(study))
    assert [t["state"] for t in got] == ["COMPLETE"] * N
    assert [t["params"] for t in got] == [t["params"] for t in want]
    assert [t["value"] for t in got] == pytest.approx([t["value"] for t in want], rel=1e-5)
    members = [f"batches/{b}/{m['name']}" for b in (0, 2) for m in
               json.loads((batch_study / "batches" / str(b) / "sweep.json").read_text())["members"]]
    assert [t["run_dir"] for t in got] == members
    sweep = json.loads((batch_study / "batches/0/sweep.json").read_text())
    assert sweep["lowering"] == "vmap" and sweep["traced"] == list(SPACE)
    study = optuna.load_study(study_name="batched", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(batch_study / "study.journal"))))
    assert all(len(t.intermediate_values) == 2 for t in study.trials)


def test_a_preempted_batch_resumes_to_the_uninterrupted_bytes(batch_study, space_file, tmp_path):
    """SIGTERM while the first batch trains: both its members checkpoint, its two trials are
    queued again and the worker exits 143; run again, the batch takes its directory back and
    resumes: every trial's metrics.jsonl is the uninterrupted batched study's (its first batch:
    a study of two trials)."""
    path = tmp_path / "batched"
    args = ["--space", str(space_file), "--trials", "2", "--study", str(path),
            "--pruner", "none", "--batch", "2", "--lowering", "vmap"]
    proc = cli(*args)
    _wait_for(lambda: (path / "batches" / "0").is_dir() and all(
        _has_checkpoint(p) for p in (path / "batches" / "0").iterdir() if p.is_dir()) and len(
        [p for p in (path / "batches" / "0").iterdir() if p.is_dir()]) == 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    again = cli(*args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "continues batch 0" in out and "resuming" in out.lower()
    got, want = proper(study_json(path)), proper(study_json(batch_study))[:2]
    assert len(got) == 2
    assert [(t["params"], t["value"]) for t in got] == [(t["params"], t["value"]) for t in want]
    for t, w in zip(got, want):
        assert (path / t["run_dir"] / "metrics.jsonl").read_bytes() == \
            (batch_study / w["run_dir"] / "metrics.jsonl").read_bytes()


def test_a_diverging_trial_of_a_batch_fails_with_its_reason_and_the_others_complete(tmp_path):
    """Four trials drawn from {3e-3, 1e9} as one batch (equal draws share one member): the 1e9
    trials fail with the step and reason their member left at; the others complete, their runs
    finished."""
    space = {"optim.learning_rate": {"choices": [0.003, 1e9]}}
    out = run_search(fixed(), space, 4, tmp_path / "s", pruner="none", batch=4, quiet=True)
    trials = proper(out)
    rates = [t["params"]["optim.learning_rate"] for t in trials]
    assert set(rates) == {0.003, 1e9}, rates  # the study seed draws both
    for t in trials:
        if t["params"]["optim.learning_rate"] == 1e9:
            assert t["state"] == "FAIL" and "at step" in t["failed_reason"], t
            assert not (tmp_path / "s" / t["run_dir"] / "summary.json").exists()
        else:
            assert t["state"] == "COMPLETE", t
            assert (tmp_path / "s" / t["run_dir"] / "summary.json").is_file()
    assert out["finished_trials"] == 4


def test_a_pruned_trial_keeps_its_run_and_is_marked_at_its_epoch(tmp_path):
    """Successive halving over a grid of one good and two poor learning rates (study seed 1 orders
    the grid good first, then 1e-7, then 1e-6): the poor trials are pruned at epoch 1, their run
    directories stay, stopped at that epoch's checkpoint, and their value is the reported
    validation loss."""
    space = {"optim.learning_rate": {"choices": [3e-3, 1e-6, 1e-7]}}
    path = tmp_path / "pruned"
    out = run_search(fixed().override(["train.epochs=3"]), space, 3, path, sampler="grid",
                     pruner="halving", study_seed=1, quiet=True)
    pruned = [t for t in out["trials"] if t["state"] == "PRUNED"]
    assert len(pruned) == 2, out["trials"]
    for t in pruned:
        run = path / t["run_dir"]
        assert t["params"]["optim.learning_rate"] < 1e-5 and t["pruned_at_epoch"] == 1
        assert not (run / "summary.json").exists() and (run / "ckpt").is_dir()
        epochs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "epoch"' in l]
        assert [e["epoch"] for e in epochs] == [1] and t["value"] == epochs[0]["val_loss"]
    assert out["best"]["params"]["optim.learning_rate"] == 3e-3


def _count(record: dict) -> None:
    """Each of the study's trials finished exactly once, with parameters of its own."""
    got = proper(record)
    assert len(got) == N and all(t["state"] == "COMPLETE" for t in got), record["trials"]
    assert len({json.dumps(t["params"], sort_keys=True) for t in got}) == N
    assert record["finished_trials"] == N


def test_two_workers_on_one_machine_fill_one_study(seed_space, tmp_path):
    path = tmp_path / "pair"
    args = ["--space", str(seed_space), "--trials", str(N), "--study", str(path),
            "--pruner", "none", "--sampler", "random"]
    workers = [cli(*args, sets=ONE_EPOCH) for _ in range(2)]
    outs = [w.communicate(timeout=400)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    record = study_json(path)
    _count(record)
    ran = [line for out in outs for line in out.splitlines() if "at epoch" in line]
    assert len(ran) == N  # no trial trained twice


def test_workers_on_many_machines_share_a_postgresql_study(seed_space, tmp_path):
    """A real PostgreSQL server; a worker whose machine dies (its own study directory, killed
    mid-trial), then two workers on other machines (directories) with a 1 s heartbeat: the dead
    worker's trial is taken over once its heartbeat is stale, and each of the N trials finishes
    exactly once."""
    with postgres_server() as url:
        common = ["--space", str(seed_space), "--trials", str(N), "--storage", url,
                  "--pruner", "none", "--heartbeat", "1", "--sampler", "random"]
        lost = cli(*common, "--study", str(tmp_path / "lost" / "pg"), sets=ONE_EPOCH)
        _wait_for(lambda: (tmp_path / "lost" / "pg" / "trials" / "0" / "config.json").exists(),
                  lost)
        lost.send_signal(signal.SIGKILL)
        lost.wait()
        workers = [cli(*common, "--study", str(tmp_path / f"m{i}" / "pg"), sets=ONE_EPOCH)
                   for i in range(2)]
        outs = [w.communicate(timeout=400)[0] for w in workers]
        assert all(w.returncode == 0 for w in workers), outs
        assert main(["search", "--show", str(tmp_path / "m0" / "pg"), "--storage", url]) == 0
        record = study_json(tmp_path / "m0" / "pg")
    _count(record)
    died = [t for t in record["trials"] if "continued_by" in t]
    assert [t["number"] for t in died] == [0] and died[0]["state"] == "FAIL"
    again = next(t for t in record["trials"] if t["number"] == died[0]["continued_by"])
    assert again["params"] == died[0]["params"] and again["state"] == "COMPLETE"
    ran = [line for out in outs for line in out.splitlines() if "at epoch" in line]
    assert len(ran) == N
    assert "secret" not in url


@pytest.mark.parametrize("space, flags, message", [
    ({"optim.learnin_rate": {"low": 1e-4, "high": 1e-2}}, [], "did you mean 'optim.learning_rate'"),
    ({"optim.learning_rate": {"low": 1e-2, "high": 1e-4}}, [], "reversed"),
    ({"optim.learning_rate": {"low": 0.01, "high": 0.01}}, [], "empty"),
    ({"train.batch_size": {"choices": []}}, [], "non-empty list"),
    ({"optim.learning_rate": {"low": 0, "high": 1e-2, "log": True}}, [], "bounds > 0"),
    ({"train.batch_size": {"choices": [32, "big"]}}, [], "'big' does not fit"),
    ({"train.batch_size": {"low": 16.5, "high": 64}}, [], "integer field"),
    ({"optim.name": {"choices": ["torch_adam", "adamx"]}}, [], "unknown optim.name 'adamx'"),
    ({"optim.learning_rate": {"low": 1e-4, "high": 1e-2}}, ["--sampler", "grid"], "'step'"),
    ({"optim.learning_rate": {"low": 1e-4, "high": 1e-2}}, ["--trials", "0"], "--trials must"),
    ({"optim.learning_rate": {"low": 1e-4, "high": 1e-2}},
     ["--storage", "postgresql://me:secret@127.0.0.1:1/db"], "cannot open the database"),
    ({**SPACE, "train.batch_size": {"choices": [32, 64]}}, ["--batch", "2"],
     "train.batch_size cannot vary within one program"),
    ({"optim.learning_rate": {"low": 1e-4, "high": 1e-2}}, ["--batch", "0"], "--batch must"),
])
def test_bad_input_is_one_line_before_any_trial(tmp_path, capsys, space, flags, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    argv = ["search", "--space", str(path), "--study", str(tmp_path / "s"), *FLAGS]
    argv += [] if "--trials" in flags else ["--trials", "2"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert "secret" not in err
    assert not (tmp_path / "s" / "trials").exists()


def test_a_study_run_with_another_space_is_refused_with_the_difference(study, tmp_path, capsys):
    other = tmp_path / "space.json"
    other.write_text(json.dumps({**SPACE, "augment.rotate": {"low": 0, "high": 15}}))
    assert main(["search", "--space", str(other), "--trials", str(N), "--study", str(study),
                 "--pruner", "none", *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "augment.rotate" in err and '"high": 10' in err and '"high": 15' in err
    assert "Traceback" not in err


def test_optuna_dashboard_opens_the_study_and_compare_reads_it(study, tmp_path):
    """The real optuna-dashboard server on the study's journal lists the study and its trials;
    `cnnjax compare` ranks the trials' runs from study.json."""
    import socket
    import urllib.request

    from cnnjax import compare_runs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = pathlib.Path(sys.executable).with_name("optuna-dashboard")
    server = subprocess.Popen([str(dashboard), str(study / "study.journal"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("optuna-dashboard did not answer")
    finally:
        server.terminate()
        server.wait()
    assert [s["study_name"] for s in studies] == [study.name]
    page = compare_runs([study], tmp_path / "compare", calibrate=False)
    html = pathlib.Path(page).read_text()
    assert all(f"trial {n}" in html for n in range(N))
