"""Faults on the newer surfaces, tried as a user meets them: a run stopped before its first
checkpoint, a finished run resumed, warnings, a user's module or callback that fails."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import cnnjax
from cnnjax import Callback, Config, train_and_evaluate
from cnnjax.cli import main
from faultkit import cli_many, one_error_line

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



KINDS = textwrap.dedent("""\
    import jax.numpy as jnp
    import numpy as np
    import optax

    NUMBER = 42


    def not_a_model(num_classes):
        return 42


    def factory_raises(num_classes):
        raise RuntimeError("weights file missing")


    def loss_per_batch(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


    def loss_int(logits, labels):
        return labels


    def opt_dict(cfg, learning_rate):
        return {"lr": learning_rate}


    def schedule_vector(cfg, total_steps):
        return lambda step: jnp.ones(3) * cfg.learning_rate


    def schedule_str(cfg, total_steps):
        return "fast"


    def data_list():
        return [np.zeros((4, 8, 8), np.uint8)]


    def data_raises():
        raise RuntimeError("disk not mounted")


    def aug_2x2(cfg):
        return lambda key: jnp.eye(2)


    def aug_raises(cfg):
        def transform(key):
            raise IndexError("matrix")
        return transform
""")


def _line(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def test_user_objects_of_the_wrong_kind_are_named_before_anything_compiles(tmp_path):
    """Each import path names something of the wrong kind, or code that fails: one line naming
    the setting, what it found and what was expected (with the user's file and line where their
    code raised), exit 2, no traceback, and no run directory: nothing was compiled."""
    (tmp_path / "usermods_kinds.py").write_text(KINDS)
    at = lambda text: f"usermods_kinds.py:{_line(KINDS, text)}: "
    cases = {  # --set KEY=usermods_kinds:NAME -> what the one line says
        ("model.name", "NUMBER"): "names an int (42), not a flax.linen Module class",
        ("model.name", "not_a_model"): "built an int (42), not a flax.linen Module",
        ("model.name", "factory_raises"): at("weights file") + "RuntimeError: weights file missing",
        ("train.loss", "NUMBER"): "is an int (42), not a function (logits, labels) -> per-example",
        ("train.loss", "loss_per_batch"): "returns () for 2 examples; it must return one loss per",
        ("train.loss", "loss_int"): "returns int32 losses; they must be floats",
        ("optim.name", "NUMBER"): "names an int (42), not a factory(cfg, learning_rate) returning "
                                  "an optax.GradientTransformation",
        ("optim.name", "opt_dict"): "returned a dict ({'lr': 0.001}); an optimizer factory",
        ("optim.schedule", "schedule_vector"): "returned a schedule that gives float32[3] for a "
                                               "step count",
        ("optim.schedule", "schedule_str"): "returned a str ('fast'); a schedule returns",
        ("data.dataset", "data_list"): "must be (or return) a dict {'train': (images, labels)",
        ("data.dataset", "data_raises"): at("disk not") + "RuntimeError: disk not mounted",
        ("augment.order", "NUMBER"): "names an int (42), not a factory(cfg) returning a Transform",
        ("augment.order", "aug_2x2"): "its Transform returns float32[2, 2] for a key; it must "
                                      "return the 3x3 affine matrix",
        ("augment.order", "aug_raises"): at("matrix") + "IndexError: matrix",
    }
    argv = [["train", "--quiet", "--epochs", "1", "--set", f"{key}=usermods_kinds:{name}"]
            for key, name in cases]
    for (key, name), expected, result in zip(cases, cases.values(), cli_many(argv, tmp_path)):
        line = one_error_line(result)
        assert f"usermods_kinds:{name}" in line and expected in line, (key, name, line)
    assert not (tmp_path / "checkpoints").exists()


def nan_when_learned(logits, labels):
    """Cross-entropy that turns NaN once the batch's mean falls below 2.27 (some steps in)."""
    import jax.numpy as jnp
    import optax

    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.where(loss.mean() < 2.27, jnp.nan, loss)


def test_a_loss_that_turns_nan_stops_the_run_naming_it(tmp_path):
    cnnjax.register_loss("nan_when_learned", nan_when_learned)
    with pytest.raises(FloatingPointError) as err:
        train_and_evaluate(tiny("train.loss=nan_when_learned"), tmp_path / "run")
    message = str(err.value)
    assert message.startswith("train.loss 'nan_when_learned': the loss is nan at step "), message
    step = int(message.split("at step ")[1].split()[0])
    last = int(message.split("Last good checkpoint: step ")[1].split()[0])
    assert 10 <= last < step and f"--resume {tmp_path / 'run'}" in message, message


class Keeps(Callback):
    """A callback keeping state across a resume: `value` into the checkpoint, back through
    `load`."""

    name = "keeps"

    def __init__(self, value, load=lambda state: None):
        self.value, self.load = value, load

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.load(state)


def test_a_callback_state_that_cannot_be_saved_or_loaded_is_named(tmp_path):
    """A state orbax could not write (a set) is refused before the save, naming the callback; a
    load_state_dict that raises on resume is named with its line, the run resumable."""
    with pytest.raises(cnnjax.CallbackError, match=r"^callback Keeps: its state_dict\(\) is not "
                       r"JSON.*TypeError: Object of type set is not JSON serializable"):
        train_and_evaluate(tiny(), tmp_path / "set", callbacks=[Keeps({1, 2})])
    run = tmp_path / "load"
    train_and_evaluate(tiny(), run, callbacks=[Keeps(1)], stop_at_step=10)

    def load(state):
        raise KeyError("threshold")

    with pytest.raises(cnnjax.CallbackError) as err:
        train_and_evaluate(tiny(), run, callbacks=[Keeps(1, load)])
    assert str(err.value).startswith("callback Keeps failed in load_state_dict"), err.value
    assert "test_reliability.py:" in str(err.value) and f"--resume {run}" in str(err.value)
