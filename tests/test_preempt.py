"""Preemption: SIGTERM and Ctrl-C checkpoint at the next step and stop; the resumed run writes the
bytes of one that never stopped. Real signals, sent to a real process (a sweep's: test_sweep.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cnnjax import Callback, Config, train_and_evaluate
from cnnjax.cli import main
from cnnjax.training import preempt
from cnnjax.training.checkpoint import Checkpointer

# All ten digits: 50 steps an epoch; a log line every 5 steps, so most steps fall between two
# lines. The model, data and augmentation of test_stream's runs: the compiled programs are shared
# through the cache.
CFG = ["model.kwargs.features=4", "model.kwargs.dense=8", "train.epochs=2",
       "model.kwargs.dropout=0.5", "augment.rotate=10", "train.log_every=5",
       "train.progress=false"]


def config(*extra):
    return Config().override(CFG + list(extra))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    path = tmp_path_factory.mktemp("preempt") / "whole"
    train_and_evaluate(config(), path)
    return path


class SignalAt(Callback):
    """Sends the process a real signal from inside the loop, after step `at`."""

    def __init__(self, at, signum):
        self.at, self.signum = at, signum

    def on_step(self, event):
        if event.step == self.at:
            # the handler lives in the main thread; elsewhere the signal would end the process
            assert threading.current_thread() is threading.main_thread()
            os.kill(os.getpid(), self.signum)


def test_a_signal_between_two_log_lines_saves_the_window_and_resumes_exactly(whole, tmp_path):
    """SIGTERM after step 7: the run checkpoints at step 8, between the log lines of steps 5 and
    10, with steps 6-8 not yet logged; the resumed run writes the step-10 line as the whole run."""
    run, before = tmp_path / "run", signal.getsignal(signal.SIGTERM)
    result = train_and_evaluate(config(), run, callbacks=[SignalAt(7, signal.SIGTERM)])
    assert (result.preempted, result.stopped_at_step, result.summary) == ("SIGTERM", 8, None)
    assert result.stop_reason == "stopped by SIGTERM at step 8"
    ckpt = Checkpointer(run, read_only=True)
    assert ckpt.steps()[-1] == 8
    pending = ckpt.read_loop(8)["pending"]
    assert pending["first_step"] == 6 and len(pending["steps"]) == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
    assert train_and_evaluate(config(), run).summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


def _train_command(run):
    cmd = [sys.executable, "-m", "cnnjax", "train", "--run-dir", str(run)]
    for item in CFG:
        cmd += ["--set", item]
    return cmd


def _wait_for_training(proc, log, lines=1, timeout=240):
    """Until `log` (a metrics.jsonl) holds `lines` lines: the steps are running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= lines:
            return
        time.sleep(0.005)
    raise AssertionError(f"{log} never reached {lines} lines")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cnnjax_train_stops_on_a_signal_and_resumes_byte_identical(whole, tmp_path, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_command(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_training(proc, run / "metrics.jsonl")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, (out, err)
    assert f"{name} received: checkpointing at the next step boundary" in err
    assert f"stopped by {name} at step" in out and f"cnnjax train --resume {run}" in out, out
    assert "Traceback" not in out + err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


_SLOW_STEP = """
import sys, time
from cnnjax import Callback, Config, train_and_evaluate

class SlowStep(Callback):  # step 12 takes a minute: the next step boundary is far
    def on_step(self, event):
        if event.step == 12:
            print("slow", flush=True)
            time.sleep(60)

try:
    train_and_evaluate(Config().override(sys.argv[2:]), sys.argv[1], callbacks=[SlowStep()])
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_second_ctrl_c_aborts_at_once_and_the_last_checkpoint_stays(whole, tmp_path):
    """Ctrl-C during a long step asks for a stop at its end; a second one aborts at once, and the
    run resumes from its last checkpoint (step 10) to the same bytes."""
    run, extra = tmp_path / "run", ["train.checkpoint_every_steps=5"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STEP, str(run), *CFG, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "slow"
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert "SIGINT received" in proc.stderr.readline()
        time.sleep(1)  # the handler ran: by now the main thread is back inside the long sleep
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == 130 and seconds < 30, (seconds, out, err)
    assert "SIGINT again: aborting" in err
    assert Checkpointer(run, read_only=True).steps()[-1] == 10
    assert train_and_evaluate(config(*extra), run).summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


def test_exit_status_is_the_shells():
    assert preempt.exit_status("SIGINT") == 130 and preempt.exit_status("SIGTERM") == 143
