"""Streaming through grain against the in-memory path: the same batches, the same bytes in
metrics.jsonl, resume after a real SIGKILL, a worker killed or stopped for real, bad image files.

The reference is always the in-memory run (or its batches), which never touches grain."""

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cnnjax import Config, train_and_evaluate
from cnnjax.config import DataConfig
from cnnjax.data import input_pipeline, store, stream
from cnnjax.training.checkpoint import Checkpointer

# All ten digits: 50 steps an epoch, so a kill lands mid-epoch; dropout and rotation on, their
# per-example draws keyed by 'index', which the streamed batches must carry unchanged.
CFG = ["model.kwargs.features=4", "model.kwargs.dense=8", "train.epochs=2", "train.progress=false",
       "model.kwargs.dropout=0.5", "augment.rotate=10", "train.log_every=5",
       "train.checkpoint_every_steps=10"]


def config(*extra):
    return Config().override(CFG + list(extra))


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "in_memory"
    train_and_evaluate(config("data.stream=off"), path)
    return path


def assert_same_batches(ours, theirs):
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- settings


def test_settings_are_checked_and_a_config_without_them_loads():
    for key, value, message in [("stream", "maybe", "choose one of auto, on, off"),
                                ("workers", -1, "give 0"), ("max_memory_gb", 0, "give a positive"),
                                ("read_timeout_s", 0, "give a positive"),
                                ("on_bad_image", "ignore", "choose one of error, skip")]:
        with pytest.raises(ValueError, match=rf"data.{key}=.* is not valid: {message}"):
            DataConfig(**{key: value})
    old = Config.from_dict({"data": {"dataset": "mnist5k", "val_fraction": 0.2}})
    assert (old.data.stream, old.data.workers, old.data.on_bad_image) == ("auto", 0, "error")
    assert json.loads(Config().to_json())["data"]["max_memory_gb"] == 4.0


def test_auto_streams_what_exceeds_the_memory_budget():
    digits = 5000 * 28 * 28  # mnist5k's decoded pixels, train and test
    assert input_pipeline.decoded_bytes(DataConfig()) == digits
    assert not input_pipeline.streams(DataConfig())
    assert input_pipeline.streams(DataConfig(max_memory_gb=digits / 1e9 * 0.99))
    assert not input_pipeline.streams(DataConfig(stream="off", max_memory_gb=1e-6))
    pixels = np.arange(24, dtype=np.uint8).reshape(6, 2, 2)
    input_pipeline.sources.register_dataset("stream_arrays", {
        "train": (pixels[:4], np.arange(4) % 2), "test": (pixels[4:], np.arange(2))})
    assert not input_pipeline.streams(DataConfig(dataset="stream_arrays", max_memory_gb=1e-9))
    with pytest.raises(ValueError, match="arrays of your own, already in memory"):
        input_pipeline.streams(DataConfig(dataset="stream_arrays", stream="on"))


# ----------------------------------------------------------------------------- the batches


def test_uint8_tensor_records_decode_as_tfds_writes_them():
    """`store.packed_uint8` against TFDS's own serializer and decoder: every value 0..255, one and
    three channels; records of another layout are left to TFDS (None), whose decoder then reads
    them (PNG-encoded images: test_tfds_prepared's streamed datasets)."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    for shape in ((4, 5, 3), (6, 2, 1)):
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3)})
        images = rng.integers(0, 256, (7, *shape), dtype=np.uint8)
        images[0].flat[:4] = [0, 127, 128, 255]
        records = [features.serialize_example({"image": x, "label": i % 3})
                   for i, x in enumerate(images)]
        np.testing.assert_array_equal(store.packed_uint8(records, b"image", shape), images)
        for record, image in zip(records, images):
            np.testing.assert_array_equal(features.deserialize_example_np(record)["image"], image)
        assert store.packed_uint8(records, b"label", shape) is None  # one value, not 4*5*3
        assert store.packed_uint8(records, b"mask", shape) is None  # no such feature
    wide = tfds.features.FeaturesDict({"image": tfds.features.Tensor(shape=(3,), dtype=np.int64)})
    assert store.packed_uint8([wide.serialize_example({"image": [1, 300, 2]})], b"image",
                              (3,)) is None  # a value beyond 255
    for encoding in ("bytes", "zlib"):  # uint8 Tensors TFDS stores as a bytes_list
        encoded = tfds.features.FeaturesDict({"image": tfds.features.Tensor(
            shape=(4, 5, 3), dtype=np.uint8, encoding=encoding)})
        image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        assert store.packed_uint8([encoded.serialize_example({"image": image})], b"image",
                                  (4, 5, 3)) is None


def test_streamed_batches_are_the_in_memory_batches():
    """Every process's rows of every batch, from any start, evaluation padded and masked, one
    pass after another; a position saved mid-epoch restores the batches that follow."""
    cfg = DataConfig(classes=(3, 1, 4))
    memory = input_pipeline.open_data(cfg, seed=5)
    streamed = input_pipeline.open_data(DataConfig(classes=(3, 1, 4), stream="on"), seed=5)
    assert isinstance(memory, input_pipeline.Data) and isinstance(streamed, stream.Streamed)
    assert streamed.spec == memory.spec
    try:
        for part in ((0, 1), (1, 2)):
            for epoch, start in ((1, 0), (2, 7), (4, 0)):
                assert_same_batches(streamed.train_batches(48, 5, epoch, start, part),
                                    memory.train_batches(48, 5, epoch, start, part))
            for split in ("val", "val", "test"):  # a second pass of the same reader, then another
                assert_same_batches(streamed.eval_batches(split, 64, part),
                                    memory.eval_batches(split, 64, part))
        images, labels = streamed.images("val")
        np.testing.assert_array_equal(labels, memory.val[1])
        np.testing.assert_array_equal(images[[5, 0, 9]], memory.val[0][[5, 0, 9]])
        np.testing.assert_array_equal(np.asarray(images), memory.val[0])
        batches = streamed.train_batches(48, 5, 2, 0)
        assert_same_batches([next(batches) for _ in range(3)],
                            list(memory.train_batches(48, 5, 2, 0))[:3])
        saved = json.loads(json.dumps(streamed.position()))
        assert saved["position"] == streamed.size("train") // 48 + 3
    finally:
        streamed.close()
    resumed = input_pipeline.open_data(DataConfig(classes=(3, 1, 4), stream="on"), seed=5)
    resumed.restore(saved)
    try:
        assert_same_batches(resumed.train_batches(48, 5, 2, 3), memory.train_batches(48, 5, 2, 3))
        assert resumed.position()["start"] == saved["start"]  # grain's state was set, not rebuilt
    finally:
        resumed.close()


def test_worker_processes_read_the_same_batches_and_resume_from_grain_state():
    memory = input_pipeline.open_data(DataConfig(), seed=2)
    streamed = input_pipeline.open_data(DataConfig(stream="on", workers=2), seed=2)
    try:
        batches = streamed.train_batches(64, 2, 1, 0, (1, 2))
        assert_same_batches([next(batches) for _ in range(7)],
                            list(memory.train_batches(64, 2, 1, 0, (1, 2)))[:7])
        saved = json.loads(json.dumps(streamed.position()))
        assert len(saved["grain"]["iterators_in_use_states"]) == 2  # one state per worker
    finally:
        streamed.close()
    resumed = input_pipeline.open_data(DataConfig(stream="on", workers=2), seed=2)
    resumed.restore(saved)
    try:
        assert_same_batches(resumed.train_batches(64, 2, 1, 7, (1, 2)),
                            memory.train_batches(64, 2, 1, 7, (1, 2)))
        assert_same_batches(resumed.eval_batches("test", 300, (1, 2)),
                            memory.eval_batches("test", 300, (1, 2)))
    finally:
        resumed.close()


def test_a_streamed_run_writes_the_in_memory_bytes(in_memory, tmp_path):
    result = train_and_evaluate(config("data.stream=on"), tmp_path / "streamed")
    assert (tmp_path / "streamed" / "metrics.jsonl").read_bytes() == \
        (in_memory / "metrics.jsonl").read_bytes()
    whole = json.loads((in_memory / "summary.json").read_text())
    assert result.summary["test"] == whole["test"]
    assert result.summary["dead_filters"] == whole["dead_filters"]
    assert result.summary["data"] == {"streamed": True, "workers": 0}
    assert whole["data"] == {"streamed": False}


# ----------------------------------------------------------------------------- image folders


def _folder(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Two classes of 10x10 PNGs (each its class's colour under noise), a truncated JPEG and a
    file that is no image; returns the bad files."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("blue", "red")):
        (root / name).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 120, (10, 10, 3), dtype=np.uint8)
            pixels[..., 2 - 2 * c] += 120
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    bad = {"truncated": root / "blue" / "cut.jpg", "not an image": root / "red" / "note.png"}
    bad["truncated"].write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    bad["not an image"].write_bytes(b"a text file named .png")
    return bad


def test_a_streamed_folder_is_read_from_its_files_and_skips_what_the_in_memory_copy_skips(tmp_path):
    bad = _folder(tmp_path / "photos")
    data_dir = tmp_path / "tfds"
    folder = [f"data.dataset=imagefolder:{tmp_path / 'photos'}", f"data.data_dir={data_dir}",
              "train.batch_size=16", "train.checkpoint_every_steps=0", "train.epochs=1"]
    for mode in ("on", "off"):
        with pytest.raises(ValueError, match=rf"{bad['truncated']} cannot be read as an image .*"
                                             rf"data.on_bad_image=skip"):
            input_pipeline.open_data(config(*folder, f"data.stream={mode}").data, 0)
    with pytest.warns(RuntimeWarning, match=r"skipped 2 unreadable images \(data.on_bad_image="
                                            r"skip\): blue/cut.jpg, red/note.png"):
        train_and_evaluate(config(*folder, "data.stream=on", "data.on_bad_image=skip"),
                           tmp_path / "streamed")
    assert not list(data_dir.rglob("*.array_record*"))  # nothing prepared: read from the files
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable images"):
        train_and_evaluate(config(*folder, "data.stream=off", "data.on_bad_image=skip"),
                           tmp_path / "in_memory")
    runs = [tmp_path / "streamed", tmp_path / "in_memory"]
    assert (runs[0] / "metrics.jsonl").read_bytes() == (runs[1] / "metrics.jsonl").read_bytes()
    assert (runs[0] / "data_spec.json").read_text() == (runs[1] / "data_spec.json").read_text()
    for run, streamed in zip(runs, (True, False)):
        report = json.loads((run / "summary.json").read_text())["data"]
        assert report["streamed"] is streamed
        assert report["skipped_images"] == 2
        assert report["skipped_files"] == ["blue/cut.jpg", "red/note.png"]


# ----------------------------------------------------------------------------- faults, for real


def _train(run_dir, *extra, **popen):
    cmd = [sys.executable, "-m", "cnnjax", "train", "--quiet", "--run-dir", str(run_dir)]
    for item in CFG + ["data.stream=on", "data.workers=1", *extra]:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _workers(pid: int) -> list[int]:
    """The grain worker processes `pid` started (multiprocessing's spawned children)."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"spawn_main" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in pathlib.Path(f"/proc/{pid}/status").read_text().split("State:")[1][:3]
    except (OSError, IndexError):
        return False


def _when(proc, run_dir, after: int, mid_epoch: bool = False):
    """Waits for a checkpoint beyond step `after` (one within an epoch of 50 steps, if
    `mid_epoch`) and a worker of `proc`; returns (step, worker)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in (run_dir / "ckpt").glob("*") if p.name.isdigit()] \
            if (run_dir / "ckpt").exists() else []
        workers = _workers(proc.pid)
        if steps and max(steps) > after and workers and not (mid_epoch and max(steps) % 50 == 0):
            return max(steps), workers[0]
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint after step {after}: {proc.communicate()}")


def _ended_with(proc, message: str) -> int:
    """Checks the run ended with exactly one line on stderr, `message` and its last good
    checkpoint; returns that checkpoint's step."""
    out, err = proc.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("cnnjax train: error: ") and message in lines[0], lines[0]
    match = re.search(r"Last good checkpoint: step (\d+) in .*; resume with cnnjax train "
                      r"--resume ", lines[0])
    assert match, lines[0]
    return int(match.group(1))


def test_a_dead_or_hung_worker_or_a_killed_trainer_resumes_to_the_uninterrupted_bytes(in_memory,
                                                                                    tmp_path):
    """A worker SIGKILLed: the run ends with one line and its last checkpoint. Resumed, a worker
    SIGSTOPped: the deadline ends it. Resumed, the trainer SIGKILLed mid-epoch: its worker exits
    too. Resumed once more, to the end: the bytes of the run that never stopped."""
    run = tmp_path / "run"
    proc = _train(run)
    _, worker = _when(proc, run, 0)
    os.kill(worker, signal.SIGKILL)
    last = _ended_with(proc, "a data worker process died while reading the training data (exit "
                             "code -9, SIGKILL).")

    proc = _train(run, "data.read_timeout_s=4")  # a reading setting: the resume takes it
    _, worker = _when(proc, run, last)  # reading, past the resumed step
    os.kill(worker, signal.SIGSTOP)
    started = time.monotonic()
    last = _ended_with(proc, "no batch of the training data arrived within 4 s "
                             "(data.read_timeout_s): a data reader hangs (one of 1 worker "
                             "processes).")
    assert time.monotonic() - started < 60 and not _alive(worker)

    proc = _train(run)
    _when(proc, run, last, mid_epoch=True)
    workers = _workers(proc.pid)  # the training reader's, and the validation reader's if started
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # its pipes close: no worker holds them
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "a worker outlived its trainer"
    ckpt = Checkpointer(run, read_only=True)
    saved = ckpt.read_loop(ckpt.steps()[-1])
    ckpt.close()
    assert saved["batch"] > 0 and saved["data"]["workers"] == 1  # mid-epoch, grain's state saved

    summary = train_and_evaluate(config("data.stream=on"), run).summary  # no workers this time
    assert summary["resumed"]
    assert (run / "metrics.jsonl").read_bytes() == (in_memory / "metrics.jsonl").read_bytes()
