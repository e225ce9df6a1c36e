"""CIFAR-10/100 from binary archives written here byte by byte (tests/fixtures.py), TFDS's own
checksum files, and the standard CIFAR augmentation against a padded-crop reference."""

import importlib.resources
import json
import socket
import time
import warnings

import jax
import numpy as np
import pytest

import cnnjax
from cnnjax.config import AugmentConfig, DataConfig
from cnnjax.data import augment, cifar, datasets, input_pipeline

from fixtures import cifar_records, write_cifar_archive

C10 = "cifar-10-batches-bin/"
C100 = "cifar-100-binary/"
BATCH_SIZES = (3, 2, 4, 1, 2)  # data_batch_1..5: 12 training images


def names_file(names) -> bytes:
    return ("\n".join(names) + "\n\n").encode()  # the official files end with blank lines


def random_set(rng, n, label_high):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, label_high, n)


@pytest.fixture
def cifar10_files(tmp_path):
    rng = np.random.default_rng(0)
    train = random_set(rng, sum(BATCH_SIZES), 10)
    test = random_set(rng, 5, 10)
    members, start = {}, 0
    for i, n in enumerate(BATCH_SIZES, 1):
        members[f"{C10}data_batch_{i}.bin"] = cifar_records(train[0][start:start + n],
                                                            train[1][start:start + n])
        start += n
    members[f"{C10}test_batch.bin"] = cifar_records(*test)
    members[f"{C10}batches.meta.txt"] = names_file(cifar.CIFAR10_CLASSES)
    manual = tmp_path / "manual"
    manual.mkdir()
    return manual, members, {"train": train, "test": test}


def write(manual, members, name="cifar-10-binary.tar.gz"):
    write_cifar_archive(manual / name, members)
    return manual / name


def load(name, split, tmp_path, manual, **kw):
    cfg = DataConfig(dataset=name, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual), **kw)
    return input_pipeline.load_split(cfg, split)


def test_cifar10_round_trips_pixels_labels_and_order(tmp_path, cifar10_files):
    manual, members, expected = cifar10_files
    archive = write(manual, members)
    with pytest.warns(RuntimeWarning, match=str(archive)):  # not the official archive's sha256
        images, labels = load("cifar10", "train", tmp_path, manual)
    for split in ("train", "test"):
        images, labels = load("cifar10", split, tmp_path, manual)
        assert images.dtype == np.uint8 and images.shape == (len(expected[split][1]), 32, 32, 3)
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
    spec = input_pipeline.dataset_spec(DataConfig(dataset="cifar10"))
    assert spec.image_shape == (32, 32, 3) and spec.num_classes == 10
    assert spec.class_names[:3] == ("airplane", "automobile", "bird") and len(spec.mean) == 3


def test_cifar100_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(1)
    sets = {}
    for split, n in (("train", 7), ("test", 4)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        coarse, fine = rng.integers(0, 20, n), rng.integers(0, 100, n)
        sets[split] = (images, coarse, fine)
    manual = tmp_path / "manual"
    manual.mkdir()
    write(manual, {
        f"{C100}train.bin": cifar_records(sets["train"][0], np.stack(sets["train"][1:], 1)),
        f"{C100}test.bin": cifar_records(sets["test"][0], np.stack(sets["test"][1:], 1)),
        f"{C100}fine_label_names.txt": names_file(cifar.CIFAR100_CLASSES),
        f"{C100}coarse_label_names.txt": names_file(cifar.CIFAR100_SUPERCLASSES),
    }, "cifar-100-binary.tar.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for split, (images, coarse, fine) in sets.items():
            got_images, got_fine = load("cifar100", split, tmp_path, manual)
            np.testing.assert_array_equal(got_images, images)
            np.testing.assert_array_equal(got_fine, fine)
            for label in ("coarse", "coarse_label"):
                np.testing.assert_array_equal(load("cifar100", split, tmp_path, manual,
                                                   label=label)[1], coarse)
            np.testing.assert_array_equal(load("cifar100", split, tmp_path, manual,
                                               label="fine")[1], fine)
    coarse_spec = input_pipeline.data_spec(DataConfig(dataset="cifar100", label="coarse"))
    assert coarse_spec.num_classes == 20 and coarse_spec.class_names[-1] == "vehicles_2"
    assert input_pipeline.data_spec(DataConfig(dataset="cifar100")).num_classes == 100
    with pytest.raises(ValueError, match="data.label='medium'.*'coarse'.*'fine'"):
        input_pipeline.data_spec(DataConfig(dataset="cifar100", label="medium"))


def test_checksums_and_urls_are_tfds_own():
    checksum_dir = importlib.resources.files("tensorflow_datasets") / "url_checksums"
    for name, builder in datasets._BUILDERS.items():
        if not name.startswith("cifar"):
            continue
        line = next(l for l in (checksum_dir / f"{name}.txt").read_text().splitlines()
                    if "binary" in l)
        url, size, sha256, filename = line.split("\t")
        assert {u: (i.size, i.checksum, i.filename) for u, i in builder.url_infos.items()} == {
            url: (int(size), sha256, filename)}


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update({f"{C10}data_batch_3.bin": m[f"{C10}data_batch_3.bin"][:-1]}),
     r"data_batch_3.bin.*not a whole number of 3073-byte records"),
    (lambda m: m.pop(f"{C10}data_batch_5.bin"), r"lacks cifar-10-batches-bin/data_batch_5.bin"),
    (lambda m: m.update({f"{C10}test_batch.bin": b"\x0c" + m[f"{C10}test_batch.bin"][1:]}),
     r"test_batch.bin.*label byte 0 holds 12, but there are 10 classes"),
])
def test_damaged_archives_are_refused_by_name(tmp_path, cifar10_files, damage, message):
    manual, members, _ = cifar10_files
    damage(members)
    write(manual, members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=message):
            load("cifar10", "train", tmp_path, manual)
    assert not (tmp_path / "tfds" / "cnnjax_cifar10" / "1.0.0" / "dataset_info.json").exists()


def test_a_manual_dir_without_the_archive_says_what_to_download(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "cifar-10-python.tar.gz").write_bytes(b"a pickle archive")
    with pytest.raises(FileNotFoundError,
                       match=r"lacks cifar-10-binary.tar.gz.*kriz/cifar-10-binary.tar.gz"):
        load("cifar10", "train", tmp_path, tmp_path / "manual")


def test_a_truncated_archive_is_refused(tmp_path, cifar10_files):
    manual, members, _ = cifar10_files
    archive = write(manual, members)
    archive.write_bytes(archive.read_bytes()[:-300])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="not a complete tar.gz archive"):
            load("cifar10", "train", tmp_path, manual)


def test_crop_and_flip_are_torchvision_random_crop_with_padding():
    """Each output is a 32x32 crop of the zero-padded image (offsets 0..8), mirrored or not."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    pipeline = augment.from_config(AugmentConfig(crop=4, flip=True))
    out = np.asarray(pipeline(images, jax.random.key(0), np.arange(64, dtype=np.int32)))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    seen = set()
    for i in range(64):
        matches = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                   if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(
                       padded[i, oy:oy + 32, ox:ox + 32]))]
        assert len(matches) == 1, i
        seen.add(matches[0])
    # 64 draws reach every row and column offset and both mirrorings (fixed key: deterministic)
    assert {oy for oy, _, _ in seen} == {ox for _, ox, _ in seen} == set(range(9))
    assert {f for *_, f in seen} == {False, True}


def test_crop_left_out_of_the_order_is_refused():
    with pytest.raises(ValueError, match=r"leaves out \['crop'\]"):
        augment.from_config(AugmentConfig(crop=4, order=("flip",)))


def test_cnnjax_train_on_cifar10_files_end_to_end(tmp_path, cifar10_files):
    """`cnnjax train --dataset cifar10 --manual-dir DIR` with the CIFAR recipe's augmentation: the
    SeedCNN sizes itself for 32x32x3, the run keeps the class names, and the reloaded run scores
    the test split as training did."""
    manual, members, expected = cifar10_files
    write(manual, members)
    cfg = cnnjax.Config().override([
        "data.dataset=cifar10", f"data.manual_dir={manual}", f"data.data_dir={tmp_path / 'tfds'}",
        "data.val_fraction=0.25", "model.kwargs.features=4", "model.kwargs.dense=8", "augment.crop=4",
        "augment.flip=true", "train.epochs=1", "train.batch_size=3", "train.progress=false"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = cnnjax.train_and_evaluate(cfg, tmp_path / "run")
    assert result.summary["test"]["count"] == 5
    spec = json.loads((tmp_path / "run" / "data_spec.json").read_text())["spec"]
    assert spec["image_shape"] == [32, 32, 3] and spec["class_names"][-1] == "truck"
    assert spec["mean"] == list(cifar.CnnjaxCifar10.MEAN)
    run = cnnjax.load_run(tmp_path / "run")
    assert run.evaluate(*expected["test"])["accuracy"] == result.summary["test"]["accuracy"]


def test_offline_without_a_manual_dir_fails_fast_with_what_to_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"www.cs.toronto.edu cannot be reached.*"
                                                r"kriz/cifar-100-binary.tar.gz.*--manual-dir"):
        input_pipeline.load_split(DataConfig(dataset="cifar100", data_dir=str(tmp_path)), "train")
    assert time.perf_counter() - start < 30  # not TFDS's minutes of retries
