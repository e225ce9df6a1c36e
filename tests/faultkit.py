"""Fault injection for cnnjax's commands, for tests of any command that writes a directory and
can be resumed (`cnnjax train`, a sweep, a search worker, a streamed run):

    reference = tmp_path / "whole"
    run_to_end(command(reference))
    outcomes = kill_and_resume(command, resume, trials, reference, tmp_path,
                               compare=["metrics.jsonl"], complete=["summary.json"])

Each trial starts `command(out)` in a fresh directory, SIGKILLs it at the trial's first moment,
starts `resume(out)` and kills that at the next moment, and so on; a last `resume(out)` runs to
the end. Then every file of `compare` must hold the reference's bytes and every file of
`complete` must be whole JSON. A kill is real (SIGKILL of the subprocess, no handler runs); the
moments are seeded draws spread over a run's life (`startup`, `mid_log`, `saving`, `finishing`),
so a failure names the trial and its moments, and rerunning the test replays the same draws.

`cli_many` runs many `cnnjax` command lines in one interpreter and returns each one's exit code
and output: the quick way to check that a user's mistake is one line without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

Command = Callable[[pathlib.Path], list[str]]


@dataclasses.dataclass(frozen=True)
class Moment:
    """When to kill: once `ready(out)` holds (polled about every millisecond) and `delay` seconds
    more. `name` says where in the run it is meant to land."""

    name: str
    ready: Callable[[pathlib.Path], bool]
    delay: float = 0.0


def startup(rng: random.Random, first: str = "config.json", within: float = 0.6) -> Moment:
    """A random instant of the `within` seconds after `first` appears: the data loading, the
    compiling and the first steps, before the first checkpoint."""
    seconds = rng.uniform(0.0, within)
    return Moment(f"start-up, {seconds:.2f}s after {first}", lambda out: (out / first).exists(),
                  seconds)


def count_lines(path: pathlib.Path) -> int:
    """Lines written so far to `path` (0 while it does not exist)."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def mid_log(rng: random.Random, log: str, lines: int) -> Moment:
    """Just after a random one of the first `lines` lines of the log `log` (relative to the
    output directory) is written: mid-epoch, between log lines."""
    n = rng.randint(1, lines)
    delay = rng.uniform(0.0, 0.05)
    return Moment(f"after line {n} of {log} (+{delay * 1000:.0f}ms)",
                  lambda out: count_lines(out / log) >= n, delay)


def saving(pattern: str = "**/*.orbax-checkpoint-tmp*") -> Moment:
    """While a checkpoint is being written: a step directory still under its temporary name."""
    return Moment("during a checkpoint save", lambda out: any(out.glob(pattern)))


def finishing(rng: random.Random, first: str = "*.png", within: float = 0.6) -> Moment:
    """A random instant of the `within` seconds after the first file matching `first` appears:
    at the end, while plots and summary.json are written."""
    delay = rng.uniform(0.0, within)
    return Moment(f"at the end, {delay:.2f}s after the first {first}",
                  lambda out: any(out.glob(first)), delay)


@dataclasses.dataclass
class Outcome:
    """One trial: its moments, what each kill found (`landed`: the process was still running;
    `during`: what `probe` said of the directory at the kill), and the final resume's output."""

    trial: int
    moments: tuple[str, ...]
    landed: list[bool] = dataclasses.field(default_factory=list)
    during: list[str] = dataclasses.field(default_factory=list)
    output: str = ""


def run_to_end(argv: list[str], timeout: float = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """Runs a command to its end; a non-zero exit fails with its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-2000:]}" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def _kill_at(argv: list[str], out: pathlib.Path, moment: Moment, probe, timeout: float,
             env: dict | None) -> tuple[bool, str]:
    """Starts `argv`, waits for `moment`, SIGKILLs it; (whether it was still running, probe)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not moment.ready(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} never reached {moment.name} in {timeout}s")
            time.sleep(0.001)
        end = time.monotonic() + moment.delay
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(0.001)
        landed = proc.poll() is None
        seen = probe(out) if landed else "finished before the kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return landed, seen


def kill_and_resume(command: Command, resume: Command, trials: Sequence[Sequence[Moment]],
                    reference: pathlib.Path, workdir: pathlib.Path, *,
                    compare: Sequence[str] = ("metrics.jsonl",), complete: Sequence[str] = (),
                    probe: Callable[[pathlib.Path], str] = lambda out: "",
                    timeout: float = 300, env: dict | None = None) -> list[Outcome]:
    """Runs every trial (see the module's docstring) in `workdir/trial-<i>` and checks each
    against `reference`, a directory the same command wrote without a stop. Returns the
    outcomes; a mismatch, a failed resume or a hang fails with the trial and its moments."""
    outcomes = []
    for i, moments in enumerate(trials):
        out = workdir / f"trial-{i}"
        outcome = Outcome(i, tuple(m.name for m in moments))
        for j, moment in enumerate(moments):
            landed, seen = _kill_at(command(out) if j == 0 else resume(out), out, moment, probe,
                                    timeout, env)
            outcome.landed.append(landed)
            outcome.during.append(seen)
        where = f"trial {i} (killed {' / '.join(outcome.moments)})"
        final = subprocess.run(resume(out), capture_output=True, text=True, timeout=timeout,
                               env=env)
        outcome.output = final.stdout + final.stderr
        assert final.returncode == 0 and "Traceback" not in outcome.output, \
            f"{where}: the resume {resume(out)} exited {final.returncode}:\n{outcome.output[-3000:]}"
        for name in compare:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), \
                f"{where}: {name} differs from the uninterrupted run's"
        for name in complete:
            try:
                json.loads((out / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise AssertionError(f"{where}: {name} is not whole ({err})") from None
        outcomes.append(outcome)
    return outcomes


class CliResult:
    def __init__(self, rc: int, out: str):
        self.rc, self.out = rc, out


_DRIVER = """
import json, sys, traceback
from cnnjax.cli import main
for argv in json.loads(sys.argv[1]):
    print("@@case", flush=True); print("@@case", file=sys.stderr, flush=True)
    try:
        rc = main(argv)
    except BaseException:
        traceback.print_exc()
        rc = 99
    sys.stderr.flush()
    print(f"@@rc {rc}", flush=True)
"""


def cli_many(cases: list[list[str]], cwd=None) -> list[CliResult]:
    """Runs `cnnjax.cli.main` on each argv in one fresh interpreter (as the `cnnjax` command), in
    `cwd` (where a run without --run-dir goes: checkpoints/...; a user's modules there import)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)
    outs = proc.stdout.split("@@case\n")[1:]
    errs = proc.stderr.split("@@case\n")[1:]
    assert len(outs) == len(cases), proc.stdout[-2000:] + proc.stderr[-2000:]
    results = []
    for out, err in zip(outs, errs):
        body, _, rc = out.rpartition("@@rc ")
        results.append(CliResult(int(rc), body + err))
    return results


def one_error_line(result: CliResult) -> str:
    """The single 'error:' line of a refused command; fails on a traceback, another exit code or
    more than one error line."""
    errors = [line for line in result.out.splitlines() if "error:" in line]
    assert result.rc == 2 and "Traceback" not in result.out and len(errors) == 1, result.out[-3000:]
    return errors[0]
