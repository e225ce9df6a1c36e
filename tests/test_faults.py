"""Fault injection: damaged checkpoints, two writers, damaged run files and bad user input.

Each case does what a user (or a crash) would do to a run directory, then checks that cnnjax goes
on where it can and otherwise stops with one message that names the thing and the fix. The
reference for a resumed run is the run as first written: its metrics.jsonl lines must come back
byte for byte.
"""

import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import cnnjax
from cnnjax import Config, load_run, train_and_evaluate
from cnnjax.cli import main
from cnnjax.config import ModelConfig
from cnnjax.data import datasets
from cnnjax.nn.models import build_model, check_geometry
from cnnjax.training import rundir
from cnnjax.training.checkpoint import CHECKSUMS, Checkpointer, DamagedCheckpoint
from faultkit import cli_many
from fixtures import write_cifar_archive

# 5 of the 10 classes keep it small, and let `cnnjax eval --run` be tried on a class subset.
CFG = ["model.kwargs.features=4", "model.kwargs.dense=8", "data.classes=0,1,2,3,4", "train.epochs=2",
       "train.progress=false", "train.log_every=5", "train.checkpoint_every_steps=5"]
CLI_CFG = [arg for item in CFG for arg in ("--set", item)]


def config(*extra):
    return Config().override(CFG + list(extra))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped mid-way with three checkpoints; tests damage copies of it."""
    path = tmp_path_factory.mktemp("faults") / "stopped"
    train_and_evaluate(config(), path, stop_at_step=25)
    return path


@pytest.fixture
def run(stopped, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped, copy)
    return copy


def steps(run):
    return Checkpointer(run, read_only=True).steps()


def abstract(run):
    """The state's shapes, from an intact checkpoint's own metadata (the model is not rebuilt)."""
    ckpt = Checkpointer(run, read_only=True)
    meta = ckpt.manager.item_metadata(ckpt.steps()[0])["state"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta,
                        is_leaf=lambda x: hasattr(x, "shape"))


def array_files(step_dir):
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def truncate(step_dir):
    for p in array_files(step_dir):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garble(step_dir):
    p = array_files(step_dir)[0]
    p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, np.uint8).tobytes())


def flip_bit(step_dir):
    p = array_files(step_dir)[-1]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated arrays": truncate,
    "garbled array": garble,
    "flipped bit": flip_bit,
    "deleted state/": lambda d: shutil.rmtree(d / "state"),
    "deleted loop JSON": lambda d: (d / "loop" / "metadata").unlink(),
    "deleted orbax metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "garbled checksums": lambda d: (d / CHECKSUMS).write_text("{not json"),
    "checksums of other files": lambda d: (d / CHECKSUMS).write_text(
        json.dumps({"sha256": {"state/_METADATA": [1, "0" * 64]}})),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_newest_step_is_moved_aside_and_the_previous_restored(run, how):
    before = steps(run)
    DAMAGE[how](run / "ckpt" / str(before[-1]))
    with pytest.warns(RuntimeWarning, match=rf"ckpt/{before[-1]} is damaged .* moved aside to "
                                            rf".*damaged-{before[-1]}"):
        _, loop, step = Checkpointer(run).restore(abstract(run))
    assert step == before[-2] and steps(run) == before[:-1]
    assert (run / "ckpt" / f"damaged-{before[-1]}").is_dir()  # kept for inspection


def test_every_step_damaged_is_one_clear_error(run):
    target = abstract(run)
    for step in steps(run):
        flip_bit(run / "ckpt" / str(step))
    with pytest.warns(RuntimeWarning), pytest.raises(FileNotFoundError, match="every checkpoint"):
        Checkpointer(run).restore(target)
    assert steps(run) == [] and len(list((run / "ckpt").glob("damaged-*"))) == 3


def test_read_only_restore_skips_a_damaged_step_without_moving_it(run):
    before = steps(run)
    flip_bit(run / "ckpt" / str(before[-1]))
    with pytest.warns(RuntimeWarning, match="was skipped"):
        assert Checkpointer(run, read_only=True).restore(abstract(run))[2] == before[-2]
    assert steps(run) == before


def test_asking_for_a_damaged_step_names_it(run):
    last = steps(run)[-1]
    flip_bit(run / "ckpt" / str(last))
    with pytest.raises(DamagedCheckpoint, match=rf"ckpt/{last} is damaged: .* does not match"):
        load_run(run, step=last)


def test_step_without_checksums_restores_with_a_warning(run):
    last = steps(run)[-1]
    (run / "ckpt" / str(last) / CHECKSUMS).unlink()
    with pytest.warns(RuntimeWarning, match="no checksums.json"):
        assert Checkpointer(run, read_only=True).restore(abstract(run))[2] == last


def test_damaged_step_is_saved_again_after_the_fallback(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    state = {"w": np.arange(100, dtype=np.float32)}
    for step in (1, 2):
        ckpt.save(step, state, {"step": step})
    flip_bit(tmp_path / "ckpt" / "2")
    target = jax.eval_shape(lambda: state)
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert ckpt.restore(target)[2] == 1
    ckpt.save(2, state, {"step": 2})
    assert ckpt.restore(target)[1] == {"step": 2}
    ckpt.close()


def test_orbax_read_only_notices_are_silenced(stopped, capfd):
    load_run(stopped)
    assert "read only" not in capfd.readouterr().err.replace("_", " ")


# ------------------------------------------------------------------- the run directory's lock


def test_the_lock_refuses_a_second_holder_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time; from cnnjax.training import rundir; "
        f"rundir.lock_run_dir(pathlib.Path({str(tmp_path)!r})); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirInUse, match=rf"{tmp_path} .*pid {holder.pid}"):
            rundir.lock_run_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.lock_run_dir(tmp_path)  # the dead holder's lock file is left, its lock is not
    rundir.close_run_dir(tmp_path)


def test_a_refused_run_leaves_no_lock(tmp_path):
    (tmp_path / "ckpt" / "10").mkdir(parents=True)  # a run to resume, of another config
    (tmp_path / "config.json").write_text(Config().set("train.epochs", 3).to_json())
    with pytest.raises(ValueError, match="train.epochs: 3 -> 30"):
        rundir.open_run_dir(tmp_path, Config())
    assert tmp_path.resolve() not in rundir._held


def test_resume_after_damage_completes_and_a_second_writer_is_refused(stopped, run, capsys):
    """One `cnnjax train --resume` falls back past a flipped bit and trains to the end, replaying
    the log; a second writer started meanwhile is refused with the first one's pid. (Killing a
    writer and resuming: test_checkpoint.py's SIGKILL test, whose resume takes the dead one's lock.)"""
    written = (stopped / "metrics.jsonl").read_bytes()
    flip_bit(run / "ckpt" / str(steps(run)[-1]))
    (run / rundir.LOCK_FILE).unlink()
    first = subprocess.Popen([sys.executable, "-m", "cnnjax", "train", "--quiet", "--resume",
                              str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (
            (run / rundir.LOCK_FILE).exists() and (run / rundir.LOCK_FILE).read_text().strip()):
        time.sleep(0.01)
    second = main(["train", "--quiet", "--resume", str(run)])
    out, _ = first.communicate(timeout=300)
    refusal = capsys.readouterr().err
    assert second == 2 and f"{run} is being written by another cnnjax process (pid {first.pid})" \
        in refusal, refusal
    assert first.returncode == 0 and "Traceback" not in out, out
    assert "is damaged" in out and "moved aside" in out
    assert (run / "summary.json").exists() and list((run / "ckpt").glob("damaged-*"))
    assert (run / "metrics.jsonl").read_bytes().startswith(written)


# ----------------------------------------------------- the CLI: one line, no traceback, exit 2


def write_gz(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_every_user_error_is_one_line_without_traceback(stopped, tmp_path):
    torch = pytest.importorskip("torch")
    train = ["train", "--quiet", "--epochs", "1", "--set", "model.kwargs.features=4", "--set", "model.kwargs.dense=8"]

    truncated_config = tmp_path / "truncated_config"
    shutil.copytree(stopped, truncated_config)
    (truncated_config / "config.json").write_text((stopped / "config.json").read_text()[:40])
    garbled_log = tmp_path / "garbled_log"
    shutil.copytree(stopped, garbled_log)
    lines = (garbled_log / "metrics.jsonl").read_text().splitlines(True)
    lines[1] = lines[1][:15] + "\n"
    (garbled_log / "metrics.jsonl").write_text("".join(lines))
    all_damaged = tmp_path / "all_damaged"
    shutil.copytree(stopped, all_damaged)
    for step in steps(all_damaged):
        truncate(all_damaged / "ckpt" / str(step))
    subset = tmp_path / "subset"
    shutil.copytree(stopped, subset)
    garbled_summary = tmp_path / "garbled_summary"
    shutil.copytree(stopped, garbled_summary)
    (garbled_summary / "summary.json").write_text('{"best_step": ')

    class Payload:
        def __reduce__(self):
            return (print, ("PAYLOAD RAN",))

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Payload()}, pickled)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")

    manual = tmp_path / "manual"  # the test files copied under the train names
    manual.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), np.uint8)
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_gz(manual / f"{prefix}-images-idx3-ubyte.gz", images, 2051)
        write_gz(manual / f"{prefix}-labels-idx1-ubyte.gz", labels, 2049)

    cifar = {}  # a CIFAR-10 archive with its last test record cut short, one without batch 5
    for name, damage in (("truncated", "test_batch.bin"), ("missing", "data_batch_5.bin")):
        cifar[name] = tmp_path / f"cifar_{name}"
        cifar[name].mkdir()
        members = {f"cifar-10-batches-bin/{f}": bytes(3073 * 2)
                   for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]}
        members["cifar-10-batches-bin/batches.meta.txt"] = b"\n".join(
            n.encode() for n in cnnjax.dataset_spec("cifar10").class_names)
        if name == "truncated":
            members["cifar-10-batches-bin/" + damage] = members["cifar-10-batches-bin/" + damage][:-5]
        else:
            del members["cifar-10-batches-bin/" + damage]
        write_cifar_archive(cifar[name] / "cifar-10-binary.tar.gz", members)
    folders = {}  # image folders with an empty class, and with a text file among the images
    for name in ("empty", "stray"):
        folders[name] = tmp_path / f"folder_{name}"
        for c in ("cat", "dog"):
            (folders[name] / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folders[name] / c / "0.png")
    (folders["empty"] / "cat" / "0.png").unlink()
    (folders["stray"] / "dog" / "notes.txt").write_text("not an image")
    data_dir = ["--data-dir", str(tmp_path / "tfds")]

    cases = {  # argv -> what the one message must name
        "empty features": (train + ["--set", "model.kwargs.features=[]"], "model.kwargs.features"),
        "NaN learning rate": (train + ["--set", "optim.learning_rate=NaN"], "finite"),
        "infinite weight decay": (train + ["--set", "optim.weight_decay=Infinity"], "finite"),
        "kernel too large": (train + ["--set", "model.kwargs.kernel_size=30"], "conv1 (kernel_size=30"),
        "zero-width dense": (train + ["--set", "model.kwargs.dense=0"], "model.kwargs.dense"),
        "file as run dir": (train + ["--run-dir", str(a_file)], "is a file"),
        "truncated config.json": (["train", "--resume", str(truncated_config)],
                                  f"{truncated_config / 'config.json'}"),
        "garbled metrics line": (["train", "--quiet", "--resume", str(garbled_log)],
                                 "metrics.jsonl, line 2"),
        "every checkpoint damaged": (["train", "--quiet", "--resume", str(all_damaged)],
                                     "every checkpoint"),
        "pickled backbone": (train + ["--set", f"transfer.backbone={pickled}"], "state_dict"),
        "garbled summary.json": (["eval", "--run", str(garbled_summary)], "summary.json"),
        "not a run": (["eval", "--run", str(tmp_path)], "config.json"),
        "unknown key": (train + ["--set", "optim.lr=1"], "optim.lr"),
        "test files as train files": (train + ["--dataset", "mnist", "--manual-dir", str(manual),
                                               "--data-dir", str(tmp_path / "tfds")],
                                      "same images"),
        "truncated CIFAR record": (train + ["--dataset", "cifar10", "--manual-dir",
                                            str(cifar["truncated"])] + data_dir,
                                   "test_batch.bin"),
        "CIFAR batch missing": (train + ["--dataset", "cifar10", "--manual-dir",
                                         str(cifar["missing"])] + data_dir, "data_batch_5.bin"),
        "empty class folder": (train + ["--dataset", f"imagefolder:{folders['empty']}"] + data_dir,
                               f"{folders['empty'] / 'cat'}"),
        "non-image in a class folder": (train + ["--dataset", f"imagefolder:{folders['stray']}"]
                                        + data_dir, "notes.txt"),
        "unknown tfds: dataset": (train + ["--dataset", "tfds:nothing"] + data_dir, "'nothing'"),
        "unknown label": (train + ["--dataset", "cifar100", "--set", "data.label=medium"],
                          "data.label='medium'"),
        "image size for arrays": (train + ["--set", "data.image_size=32"], "data.image_size"),
    }
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    results = cli_many([argv for argv, _ in cases.values()] + [["eval", "--run", str(subset)]], cwd)
    for (name, (_, expected)), result in zip(cases.items(), results):
        errors = [line for line in result.out.splitlines() if "error:" in line]
        assert result.rc == 2, (name, result.out[-3000:])
        assert "Traceback" not in result.out and "PAYLOAD RAN" not in result.out, (name, result.out)
        assert len(errors) == 1 and expected in errors[0], (name, result.out)
    assert not (cwd / "checkpoints").exists()  # a refused run leaves no run directory behind
    evaluated = results[-1]
    assert evaluated.rc == 0, evaluated.out
    assert json.loads(evaluated.out.splitlines()[-1])["count"] > 0
    assert "read only" not in evaluated.out.replace("_", " ")


# --------------------------------------------------------------- inputs checked before compiling


def test_run_predict_takes_an_empty_batch(stopped):
    run = load_run(stopped)
    empty = np.zeros((0, 28, 28), np.uint8)
    assert run.logits(empty).shape == (0, 5) and run.predict(empty).shape == (0,)


@pytest.mark.parametrize("kernel_size, layer", [(30, "conv1 (kernel_size=30"), (31, "conv1:")])
def test_kernel_that_does_not_fit_is_named(kernel_size, layer):
    model = build_model(ModelConfig(kwargs={"kernel_size": kernel_size}), 10)
    with pytest.raises(ValueError, match="^" + re.escape(layer)):
        check_geometry(model, (28, 28, 1))


def test_garbled_log_is_refused_before_training(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    with open(run / "metrics.jsonl", "r+b") as f:
        f.seek(3)
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1, is not a JSON object"):
        train_and_evaluate(config(), run)
    assert not (run / "summary.json").exists()


def test_manual_file_of_an_unofficial_size_is_warned_about(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 12), ("t10k", 10)):
        write_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                 rng.integers(0, 256, (n, 28, 28), np.uint8), 2051)
        write_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
                 rng.integers(0, 10, n).astype(np.uint8), 2049)
    with pytest.warns(RuntimeWarning, match=r"train-images-idx3-ubyte\.gz holds 12 images, the "
                                            r"official train file 60000"):
        images, _ = datasets.load("mnist", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path)
    assert len(images) == 12
