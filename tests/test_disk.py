"""A full or read-only disk, for real: the run directory on a small tmpfs in a private mount
namespace (`unshare -m`, root or a user namespace), filled up or remounted read-only at chosen
moments of a run. Each refusal must be one line naming the directory, the reason, the
checkpoints that are safe and the way on; the checkpoints already written stay byte for byte as
they were; and once space is back the run resumes to the bytes of one that never stopped.

The phases run in one interpreter inside the namespace, each through `cnnjax.cli.main` as the
command runs it; a phase that must fill the disk at a given moment adds a callback that does so
to the run's default ones (the fault is the real ENOSPC of a full tmpfs; nothing is mocked).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

# Two classes, 25 steps an epoch, a metrics line at every step: the log spans several 4 KiB
# pages, so a line that needs a new page meets the full disk. The model and batch of
# test_fault_injection's runs (dropout on): the compiled programs are shared through the cache.
CFG = ["model.kwargs.features=4", "model.kwargs.dense=8", "model.kwargs.dropout=0.5",
       "data.classes=0,1", "train.epochs=2",
       "train.batch_size=32", "train.progress=false", "train.log_every=1",
       "train.checkpoint_every_steps=10", "train.keep_checkpoints=100"]
PAGE = 4096


def _namespaces_work() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


_PHASES = textwrap.dedent("""
    import hashlib, json, os, pathlib, subprocess, sys
    from cnnjax import Callback
    from cnnjax.cli import main
    from cnnjax.report import logs
    from cnnjax.training import loop

    mnt, out, flags = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
    PAGE = int(sys.argv[4])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    run, whole = mnt / "run", out / "whole"
    train = ["train", *[a for item in flags for a in ("--set", item)]]

    def fill():  # the tmpfs to its last page: every write that needs a new page fails
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for block in (1 << 20, PAGE):
            try:
                while True:
                    os.write(fd, bytes(block))
            except OSError:
                pass
        os.close(fd)

    def unfill():
        (mnt / "filler").unlink(missing_ok=True)

    def mount(option):
        subprocess.run(["mount", "-o", f"remount,{option}", str(mnt)], check=True)

    class Fill(Callback):
        \"\"\"Fills the disk at the log line of `step`, at the epoch end `epoch`, or at the end.\"\"\"
        def __init__(self, step=None, epoch=None, end=False):
            self.step, self.epoch, self.end = step, epoch, end
        def on_log(self, e):
            if e.step == self.step:
                fill()
        def on_epoch_end(self, e):
            if e.record["epoch"] == self.epoch:
                fill()
        def on_train_end(self, e):
            if self.end:
                fill()

    defaults = loop.default_callbacks

    def hashes():
        ckpt = run / "ckpt"
        return {str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
                for step in (ckpt.iterdir() if ckpt.is_dir() else ()) if step.name.isdigit()
                for p in step.rglob("*") if p.is_file()}

    def phase(name, argv, first=None, last=None):
        loop.default_callbacks = lambda cfg, stop=None: (
            [first] * (first is not None) + defaults(cfg, stop) + [last] * (last is not None))
        before = hashes()
        for stream in (sys.stdout, sys.stderr):
            print(f"@@phase {name}", file=stream, flush=True)
        rc = main(argv)
        sys.stderr.flush()
        after = hashes()
        intact = all(after.get(k) == v for k, v in before.items())
        steps = sorted(int(p.name) for p in (run / "ckpt").glob("*") if p.name.isdigit())
        print("@@result " + json.dumps({"rc": rc, "intact": intact, "steps": steps}), flush=True)

    phase("reference", train + ["--run-dir", str(whole)])
    phase("stopped", train + ["--run-dir", str(run), "--stop-at-step", "25"])
    fill()
    phase("full at start", ["train", "--resume", str(run)])
    unfill()
    mount("ro")
    phase("read-only resume", ["train", "--resume", str(run)])
    phase("read-only new run", train + ["--run-dir", str(mnt / "new")])
    mount("rw")
    # the first metrics line after the resume point that needs a new page of the log
    lines, start = (whole / "metrics.jsonl").read_bytes().splitlines(True), 0
    for line in lines:
        record = json.loads(line)
        if record["step"] > 25 and -(-start // PAGE) < -(-(start + len(line)) // PAGE):
            break
        start += len(line)
    at = record["step"] if record["kind"] == "step" else None
    phase("full writing metrics.jsonl", ["train", "--resume", str(run)],
          first=Fill(step=at) if at else Fill(epoch=record["epoch"]))
    print("@@metrics " + json.dumps({"size": (run / "metrics.jsonl").stat().st_size}), flush=True)
    unfill()
    phase("full saving a checkpoint", ["train", "--resume", str(run)], last=Fill(epoch=2))
    unfill()
    phase("full writing plots", ["train", "--resume", str(run)], last=Fill(end=True))
    print("@@summary " + json.dumps({"exists": (run / "summary.json").exists()}), flush=True)
    unfill()
    (mnt / "old.json").write_text('{"kept": true}')
    fill()
    atomic = []
    for name in ("old.json", "new.json"):
        try:
            logs.write_json(mnt / name, {"lines": ["x" * 100] * 100})
        except OSError:
            atomic.append(sorted(p.name for p in mnt.iterdir() if p.name != "filler"))
    print("@@atomic " + json.dumps({"refused": atomic, "old": (mnt / "old.json").read_text()}),
          flush=True)
    unfill()
    phase("space back", ["train", "--resume", str(run)])
    for name in ("metrics.jsonl", "summary.json"):
        (out / name).write_bytes((run / name).read_bytes())
""")


def _phases(stdout: str, stderr: str) -> dict[str, dict]:
    """{phase: {'rc', 'intact', 'kept', 'err': its stderr lines}} from the driver's markers."""
    results = {}
    errs = {chunk.split("\n", 1)[0]: chunk.split("\n", 1)[1:] for chunk in stderr.split("@@phase ")[1:]}
    for chunk in stdout.split("@@phase ")[1:]:
        name = chunk.split("\n", 1)[0]
        result = json.loads(chunk.split("@@result ", 1)[1].split("\n", 1)[0])
        err = (errs.get(name) or [""])[0]
        results[name] = {**result, "err": [line for line in err.splitlines() if line.strip()]}
    return results


@pytest.mark.skipif(not _namespaces_work(),
                    reason="needs a private mount namespace (unshare -m) to give a run a tmpfs")
def test_a_full_or_read_only_disk_is_one_line_and_the_run_resumes_exactly(tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    proc = subprocess.run(["unshare", "-m", sys.executable, "-c", _PHASES, str(mnt), str(out),
                           json.dumps(CFG), str(PAGE)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phases = _phases(proc.stdout, proc.stderr)
    run, last = mnt / "run", json.loads((out / "whole" / "summary.json").read_text())["steps"]
    resume = f"Free space (or make it writable) and resume: cnnjax train --resume {run}"
    refused = {  # phase -> the reason its one error line gives
        "full at start": "the disk is full", "read-only resume": "the file system is read-only",
        "full writing metrics.jsonl": "the disk is full",
        "full saving a checkpoint": "the disk is full", "full writing plots": "the disk is full"}
    for name, reason in refused.items():
        result = phases[name]
        steps = result["steps"]
        assert result["rc"] == 2 and result["intact"] and steps[0] == 10, (name, result)
        assert result["err"] == [f"cnnjax train: error: cannot write to {run}: {reason}; the "
                                 f"checkpoints written before (steps {steps[0]}..{steps[-1]}) are "
                                 f"intact. {resume}"], (name, result["err"])
    new = phases["read-only new run"]
    assert new["rc"] == 2 and new["err"] == [
        f"cnnjax train: error: cannot write to {mnt / 'new'}: the file system is read-only. "
        f"Choose a --run-dir on a writable disk with free space."], new
    # the last save was the one refused; before the plots, every checkpoint was written
    assert phases["full saving a checkpoint"]["steps"][-1] < last
    assert phases["full writing plots"]["steps"][-1] == last
    # the metrics line met the full disk: the log was cut at a page's end, mid-line
    metrics = json.loads(proc.stdout.split("@@metrics ")[1].split("\n")[0])
    assert metrics["size"] % PAGE == 0, metrics
    assert json.loads(proc.stdout.split("@@summary ")[1].split("\n")[0]) == {"exists": False}
    # summary.json is written whole or not at all: the old file stays, no temporary is left
    atomic = json.loads(proc.stdout.split("@@atomic ")[1].split("\n")[0])
    assert atomic == {"refused": [["old.json", "run"], ["old.json", "run"]],
                      "old": '{"kept": true}'}, atomic
    assert phases["space back"]["rc"] == 0 and phases["space back"]["err"] == []
    assert (out / "metrics.jsonl").read_bytes() == (out / "whole" / "metrics.jsonl").read_bytes()
    summary, whole = (json.loads((d / "summary.json").read_text()) for d in (out, out / "whole"))
    assert summary.keys() == whole.keys() and summary["resumed"]
    for key in ("best_step", "steps", "epochs_run", "val", "test"):
        assert summary[key] == whole[key], key


@contextlib.contextmanager
def unwritable(path):
    """`path` and all below it made unwritable for this process: read-only permissions for a
    user, the immutable attribute for root (whom permissions do not stop)."""
    paths = [path, *path.rglob("*")]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        undo = lambda: [p.chmod(m) for p, m in modes.items()]
    elif shutil.which("chattr") and subprocess.run(["chattr", "-R", "+i", str(path)],
                                                   capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-R", "-i", str(path)], check=True)
    else:
        pytest.skip("root, and chattr +i does not work here: nothing makes a directory unwritable")
    try:
        yield
    finally:
        undo()


def test_an_unwritable_directory_is_one_line(tmp_path, capsys):
    """A new run under a parent it may not write, and a run to resume in a directory it may not
    write: one line each, naming the directory and what to do; nothing is written."""
    from cnnjax.cli import main

    flags = [a for item in CFG + ["train.epochs=1"] for a in ("--set", item)]
    parent, run = tmp_path / "parent", tmp_path / "run"
    parent.mkdir()
    assert main(["train", *flags, "--run-dir", str(run), "--stop-at-step", "10"]) == 0
    capsys.readouterr()
    with unwritable(parent), unwritable(run):
        assert main(["train", *flags, "--run-dir", str(parent / "new")]) == 2
        new = capsys.readouterr().err.strip().splitlines()
        assert main(["train", "--resume", str(run)]) == 2
        resume = capsys.readouterr().err.strip().splitlines()
    assert new == [f"cnnjax train: error: cannot write to {parent / 'new'}: it is not writable. "
                   f"Choose a --run-dir on a writable disk with free space."]
    assert resume == [f"cnnjax train: error: cannot write to {run}: it is not writable; the "
                      f"checkpoints written before (steps 10..10) are intact. Free space (or make "
                      f"it writable) and resume: cnnjax train --resume {run}"]
    assert not (parent / "new").exists()
