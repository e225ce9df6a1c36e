"""Faults on the newer surfaces, tried as a user meets them: a run stopped before its first
checkpoint, a finished run resumed, warnings, a user's module or callback that fails."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import cnnjax
from cnnjax import Callback, Config, train_and_evaluate
from cnnjax.cli import main

DATA = pathlib.Path(__file__).parent / "data"
TINY = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "train.epochs=2",
        "train.batch_size=128", "train.progress=false", "train.log_every=5",
        "train.checkpoint_every_steps=10", "train.keep_checkpoints=100"]


def tiny(*extra):
    return Config().override(TINY + list(extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("rel") / "whole"
    train_and_evaluate(tiny(), path)
    return path


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path, capsys, uninterrupted):
    """What a run killed before its first save leaves (config, logs, events, no ckpt): resuming
    it says so in one line and trains from the start, to the bytes of an uninterrupted run."""
    run = tmp_path / "early"
    shutil.copytree(uninterrupted, run, ignore=shutil.ignore_patterns("ckpt", "summary.json"))
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text()[:200])  # cut short
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "holds a run stopped before its first checkpoint: starting it afresh" in out
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()


def test_resuming_a_finished_run_says_it_finished(uninterrupted, capsys):
    assert main(["train", "--resume", str(uninterrupted)]) == 0
    out = capsys.readouterr().out
    assert f"run {uninterrupted} finished: best epoch" in out and "nothing to resume" in out


def test_every_warning_is_one_line_without_a_library_source_line(tmp_path):
    """A checkpoint without checksums (an older cnnjax's) is restored with a warning raised deep
    in the restore path: on stderr it is exactly one line."""
    run = shutil.copytree(DATA / "legacy_run", tmp_path / "run")
    (run / "ckpt" / "50" / "checksums.json").unlink(missing_ok=True)
    code = f"import cnnjax; cnnjax.load_run({str(run)!r})"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    lines = [line for line in err.splitlines() if line.strip()]
    warned = [i for i, line in enumerate(lines) if "has no checksums.json" in line]
    assert len(warned) == 1, err
    assert lines[warned[0]].startswith("cnnjax:0: RuntimeWarning: checkpoint ")
    after = lines[warned[0] + 1:warned[0] + 2]
    assert not after or not after[0].startswith(" "), err  # no indented source line follows


def test_cnnjax_warns_only_through_notices():
    package = pathlib.Path(cnnjax.__file__).parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if "warnings.warn(" in p.read_text() and p.name != "notices.py"]
    assert not offenders


BROKEN = {
    "syntax": ("def WideNet(:\n", "usermods_syntax.py:1: SyntaxError"),
    "raises": ("import os\nraise RuntimeError('no GPU found')\n",
               "usermods_raises.py:2: RuntimeError: no GPU found"),
    "dependency": ("import not_a_real_package_xyz\n",
                   "imports 'not_a_real_package_xyz', which is not installed"),
    "wrong kind": ("WideNet = 42\n", "names an int (42), not a flax.linen Module class"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_user_module_is_named_with_its_line(tmp_path, case):
    source, expected = BROKEN[case]
    name = f"usermods_{case.split()[0]}"
    (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "cnnjax", "train", "--quiet", "--epochs", "1", "--set",
         f"model.name={name}:WideNet", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and expected in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


class FailsAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_step(self, event):
        if event.step == self.at:
            raise KeyError("val_f1")


def test_a_failing_callback_is_named_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    run = tmp_path / "cb"
    with pytest.raises(cnnjax.CallbackError) as err:
        train_and_evaluate(tiny(), run, callbacks=[FailsAt(17)])
    message = str(err.value)
    assert "callback FailsAt failed in on_step at step 17" in message
    assert "test_reliability.py:" in message and "KeyError: 'val_f1'" in message
    assert "Last good checkpoint: step 10" in message and f"--resume {run}" in message
    assert train_and_evaluate(tiny(), run).summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()

