"""Datasets of the user's own (cnnjax/data/sources.py) against numpy computed by hand: registered
functions and arrays, an import path written here, per-channel statistics, every refused input."""

import json
import re
import textwrap

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from cnnjax.config import DataConfig
from cnnjax.data import datasets, input_pipeline, pixels, sources
from cnnjax.data.sources import register_dataset, spec_from_dict, spec_to_dict


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test registers into the process-wide registry; leave it as it was."""
    saved = dict(sources._REGISTRY._objects)
    yield
    sources._REGISTRY._objects.clear()
    sources._REGISTRY._objects.update(saved)
    sources._cache.clear()


def rgb32(n_train=40, n_test=10, seed=0):
    """A 3-channel 32x32 uint8 dataset with labels 0..4 in train and 0..6 in test."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_test, 32, 32, 3), dtype=np.uint8)
    x[..., 1] //= 2  # channels with different statistics
    y_train = np.arange(n_train) % 5
    y_test = np.array([6] + [i % 5 for i in range(n_test - 1)])
    return {"train": (x[:n_train], y_train), "test": (x[n_train:], y_test)}


# ----------------------------------------------------------------------------- the three kinds


def test_import_path_dataset_from_a_module_written_here(tmp_path, monkeypatch):
    (tmp_path / "user_data_mod.py").write_text(textwrap.dedent("""
        import numpy as np

        def load():
            x = np.arange(12 * 5 * 7, dtype=np.int64).reshape(12, 5, 7) % 256
            y = np.array([0, 1, 2] * 4)
            return {"train": (x[:8].astype(np.uint8), y[:8]), "test": (x[8:].astype(np.uint8), y[8:]),
                    "class_names": ["a", "b", "c"]}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = DataConfig(dataset="user_data_mod:load", val_fraction=0.25)
    spec = input_pipeline.data_spec(cfg)
    x = (np.arange(12 * 5 * 7) % 256).reshape(12, 5, 7, 1)
    assert spec == datasets.DatasetSpec(
        "user_data_mod:load", 3, (5, 7, 1), (x[:8].mean() / 255,), (x[:8].std() / 255,),
        ("train", "test"), needs_download=False, class_names=("a", "b", "c"))
    data = input_pipeline.load_data(cfg, seed=3)
    train_idx, val_idx = input_pipeline.split_indices(8, 0.25, 3)
    np.testing.assert_array_equal(data.train[0], x[train_idx])
    np.testing.assert_array_equal(data.val[0], x[val_idx])
    np.testing.assert_array_equal(data.test[1], [2, 0, 1, 2])
    assert data.train[0].dtype == np.uint8 and data.train[1].dtype == np.int32


@pytest.mark.parametrize("path, needle", [
    ("no_such_module_xyz:load", "there is no module 'no_such_module_xyz'"),
    ("json:no_such_function", "module 'json' has no 'no_such_function'"),
    ("json:dumps", "dataset 'json:dumps' is called with no arguments, but missing a required"),
    ("os:getcwd", "dataset 'os:getcwd' must be (or return) a dict"),
])
def test_import_path_failures_name_the_path(path, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        input_pipeline.data_spec(DataConfig(dataset=path))


def test_registered_function_is_called_once_and_takes_its_float_digits():
    calls = []

    @register_dataset("digits")
    def digits():
        calls.append(1)
        d = load_digits()
        x = d.images / 16.0  # floats in [0, 1]
        return {"train": (x[:1500], d.target[:1500]), "test": (x[1500:], d.target[1500:])}

    spec = input_pipeline.data_spec(DataConfig(dataset="digits"))
    data = input_pipeline.load_data(DataConfig(dataset="digits"), seed=0)
    input_pipeline.load_data(DataConfig(dataset="digits"), seed=1)
    assert len(calls) == 1
    d = load_digits()
    assert spec.image_shape == (8, 8, 1) and spec.num_classes == 10
    np.testing.assert_allclose(spec.mean, [(d.images[:1500] / 16).mean()], rtol=1e-6)
    np.testing.assert_allclose(spec.std, [(d.images[:1500] / 16).std()], rtol=1e-6)
    # float images are held as float32 in 0..255 units; normalize brings back (x - mean) / std
    assert data.test[0].dtype == np.float32 and data.test[0].shape == (297, 8, 8, 1)
    x = np.asarray(pixels.normalize(data.test[0], spec.mean, spec.std))
    np.testing.assert_allclose(x[..., 0], (d.images[1500:] / 16 - spec.mean[0]) / spec.std[0],
                               atol=1e-5)


def test_registered_arrays_three_channels_spec_and_channel_statistics():
    arrays = rgb32()
    assert register_dataset("rgb", arrays) is arrays
    spec = input_pipeline.data_spec(DataConfig(dataset="rgb"))
    pixels = arrays["train"][0].reshape(-1, 3) / 255.0
    assert spec.image_shape == (32, 32, 3)
    assert spec.num_classes == 7  # the largest label, 6, is only in test
    np.testing.assert_allclose(spec.mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(spec.std, pixels.std(0), rtol=1e-12)
    assert spec.mean[1] < 0.3 < spec.mean[0]  # the halved channel
    # computed on the whole train split, before the validation carve-out: seed-independent
    assert input_pipeline.load_data(DataConfig(dataset="rgb"), 0).spec == \
        input_pipeline.load_data(DataConfig(dataset="rgb"), 1).spec == spec


def test_channel_statistics_of_a_hand_made_case():
    # two 1x1 RGB images: per channel {0, 255}, {51, 153}, {102, 204}
    x = np.array([[[[0, 51, 102]]], [[[255, 153, 204]]]], np.uint8)
    register_dataset("tiny", {"train": (x, [0, 1]), "test": (x, [1, 0])})
    spec = input_pipeline.dataset_spec("tiny")
    np.testing.assert_allclose(spec.mean, [0.5, 0.4, 0.6], rtol=1e-12)
    np.testing.assert_allclose(spec.std, [0.5, 0.2, 0.2], rtol=1e-12)


def test_given_constants_and_class_names():
    arrays = rgb32()
    names = [f"class {i}" for i in range(7)]
    register_dataset("one", {**arrays, "mean": 0.5, "std": 0.25})
    register_dataset("per", {**arrays, "mean": [0.1, 0.2, 0.3], "std": (0.4, 0.5, 0.6),
                             "class_names": names})
    one, per = input_pipeline.dataset_spec("one"), input_pipeline.dataset_spec("per")
    assert (one.mean, one.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert (per.mean, per.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert per.class_names == tuple(names)


def test_classes_subset_of_a_registered_dataset():
    arrays = rgb32()
    register_dataset("rgb", {**arrays, "class_names": list("abcdefg")})
    cfg = DataConfig(dataset="rgb", classes=(6, 2))
    spec = input_pipeline.data_spec(cfg)
    assert spec.num_classes == 2 and spec.class_names == ("g", "c")
    test_images, test_labels = arrays["test"]
    data = input_pipeline.load_data(cfg, seed=0)
    keep = np.isin(test_labels, [6, 2])
    np.testing.assert_array_equal(data.test[0], test_images[keep])
    np.testing.assert_array_equal(data.test[1], np.where(test_labels[keep] == 6, 0, 1))
    with pytest.raises(ValueError, match=r"data.classes must be distinct labels of rgb \(0...6\)"):
        input_pipeline.data_spec(DataConfig(dataset="rgb", classes=(7,)))


def test_a_registered_name_can_be_replaced():
    register_dataset("swap", rgb32())
    assert input_pipeline.dataset_spec("swap").num_classes == 7
    arrays = rgb32()
    register_dataset("swap", {"train": arrays["train"], "test": (arrays["test"][0], [1] * 10)})
    assert input_pipeline.dataset_spec("swap").num_classes == 5


# ----------------------------------------------------------------------------- refused inputs

X = np.zeros((4, 6, 6), np.uint8)
X[0, 0, 0] = 9  # not constant, so its std is positive
Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize("raw, needle", [
    ({"train": (X, Y)}, "dataset 'bad': no 'test' split; the dict needs 'train' and 'test'"),
    ({"train": (X, Y), "test": (X, Y), "val": (X, Y)}, "unknown key(s) 'val'"),
    ({"train": (X, Y), "test": X}, "split 'test': expected an (images, labels) pair"),
    ({"train": (X[:, 0], Y), "test": (X, Y)},
     "split 'train': images must be shaped (N, H, W) or (N, H, W, C), got (4, 6)"),
    ({"train": (X, Y[:3]), "test": (X, Y)}, "split 'train': 4 images but 3 labels"),
    ({"train": (X, Y), "test": (X, Y * 0.5)}, "split 'test': labels must be integers 0..K-1, got "
                                              "dtype float64"),
    ({"train": (X, Y - 1), "test": (X, Y)}, "split 'train': labels must be integers 0..K-1, found "
                                            "-1...0; renumber the classes from 0"),
    ({"train": (X, Y[:, None]), "test": (X, Y)}, "split 'train': labels must be shaped (N,)"),
    ({"train": (X, Y), "test": (X * 2.0, Y)}, "split 'test': float images must be intensities in "
                                              "[0, 1], found [0, 18]; divide by 255"),
    ({"train": (np.full((4, 6, 6), np.nan), Y), "test": (X, Y)},
     "split 'train': float images hold NaN"),
    ({"train": (X.astype(np.int16), Y), "test": (X, Y)},
     "split 'train': images must be uint8 pixels or floats in [0, 1], got dtype int16"),
    ({"train": (X, Y), "test": (np.zeros((4, 6, 6, 3), np.uint8), Y)},
     "'train' images are shaped (6, 6, 1) (H, W, C) but 'test' images (6, 6, 3)"),
    ({"train": (X, Y), "test": (X[:0], Y[:0])}, "split 'test': the split is empty"),
    ({"train": (X, Y), "test": (X, Y), "mean": [0.1, 0.2]},
     "'mean' must be one number or one per channel (1), got 2"),
    ({"train": (X, Y), "test": (X, Y), "std": 0.0}, "'std' must be positive for every channel"),
    ({"train": (X, Y), "test": (X, Y), "std": "wide"}, "'std' must be finite numbers"),
    ({"train": (X * 0, Y), "test": (X, Y)}, "channel constant over split 'train' has std 0"),
    ({"train": (X, Y), "test": (X, Y), "class_names": ["a", "b", "c"]},
     "'class_names' must be 2 strings, one per class 0..1"),
])
def test_bad_arrays_are_refused_at_registration(raw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        register_dataset("bad", raw)
    assert "dataset 'bad'" in str(err.value)
    assert "bad" not in sources.registered()


def test_a_function_returning_bad_arrays_is_refused_when_loaded():
    register_dataset("later", lambda: {"train": (X, Y), "test": (X, Y + 0.5)})
    with pytest.raises(ValueError, match=re.escape("dataset 'later', split 'test': labels must")):
        input_pipeline.load_data(DataConfig(dataset="later"), seed=0)


@pytest.mark.parametrize("call, needle", [
    (lambda: register_dataset("mnist5k", {}), "'mnist5k' is a built-in"),
    (lambda: register_dataset("a:b", {}), "may not be empty or hold ':'"),
    (lambda: register_dataset("x", [X, Y]), "takes a function returning"),
    (lambda: register_dataset("x", lambda: [X, Y]) and input_pipeline.dataset_spec("x"),
     "dataset 'x' must be (or return) a dict"),
    (lambda: input_pipeline.dataset_spec("nothing"),
     "unknown data.dataset 'nothing'; known: cifar10, cifar100, fashion_mnist, imagefolder:PATH, "
     "mnist, mnist5k, "),
    (lambda: register_dataset("two", rgb32()) and input_pipeline.load_split("two", "val"),
     "Dataset 'two' has no split 'val'"),
])
def test_bad_names_and_sources(call, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


# ----------------------------------------------------------------------------- normalize, as_nhwc


def test_normalize_per_channel_against_a_hand_computation():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    want = (x / 255.0 - np.array(mean)) / np.array(std)
    got = np.asarray(jax.jit(lambda a: pixels.normalize(a, mean, std))(x))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mean has 2 values for 3-channel images"):
        pixels.normalize(x, (0.1, 0.2), 0.3)


def test_normalize_with_one_constant_computes_as_before():
    """The built-ins' scalar constants, and a 1-tuple, give the bits of the previous expression
    (compiled, as in the step: XLA turns the division by a constant into a multiplication)."""
    x = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    before = jax.jit(lambda a: (a.astype(np.float32) / 255.0 - 0.1307) / 0.3081)(x)
    scalar = jax.jit(lambda a: pixels.normalize(a, 0.1307, 0.3081))(x)
    one = jax.jit(lambda a: pixels.normalize(a, (0.1307,), (0.3081,)))(x)
    np.testing.assert_array_equal(np.asarray(scalar), np.asarray(before))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(before))
    np.testing.assert_allclose(np.asarray(one), (x / 255.0 - 0.1307) / 0.3081, rtol=1e-6)


def test_as_nhwc_takes_uint8_or_unit_floats_of_the_runs_shape():
    u8 = np.arange(2 * 32 * 32 * 3, dtype=np.int64).reshape(2, 32, 32, 3).astype(np.uint8)
    assert input_pipeline.as_nhwc(u8, (32, 32, 3)) is u8
    floats = u8 / 255.0
    got = input_pipeline.as_nhwc(floats, (32, 32, 3))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, u8, atol=1e-4)
    assert input_pipeline.as_nhwc(u8[..., 0], (32, 32, 1)).shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match=re.escape("(N, 32, 32, 3), got (2, 28, 28, 3)")):
        input_pipeline.as_nhwc(np.zeros((2, 28, 28, 3), np.uint8), (32, 32, 3))
    with pytest.raises(ValueError, match=re.escape("in [0, 1], found [0, 255]")):
        input_pipeline.as_nhwc(u8.astype(np.float32), (32, 32, 3))


# ----------------------------------------------------------------------------- specs


def test_builtin_specs_are_unchanged():
    assert input_pipeline.data_spec(DataConfig()) == datasets.DatasetSpec(
        "mnist5k", 10, (28, 28, 1), 0.1307, 0.3081, ("train", "test"), needs_download=False)
    assert type(input_pipeline.data_spec(DataConfig()).mean) is float
    assert input_pipeline.dataset_spec("fashion_mnist").mean == 0.2860


def test_spec_round_trips_through_json():
    register_dataset("rgb", {**rgb32(), "class_names": list("abcdefg")})
    for spec in (input_pipeline.dataset_spec("mnist5k"), input_pipeline.dataset_spec("rgb"),
                 input_pipeline.data_spec(DataConfig(dataset="rgb", classes=(3, 1)))):
        assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    assert spec_to_dict(input_pipeline.dataset_spec("mnist5k")) == {
        "name": "mnist5k", "num_classes": 10, "image_shape": [28, 28, 1], "mean": 0.1307,
        "std": 0.3081, "splits": ["train", "test"], "needs_download": False, "class_names": []}
    with pytest.raises(ValueError, match=re.escape("missing ['std'], unknown ['sd']")):
        d = spec_to_dict(input_pipeline.dataset_spec("mnist5k"))
        spec_from_dict({**{k: v for k, v in d.items() if k != "std"}, "sd": 0.3})
