"""`tfds:NAME` datasets: tiny TFDS datasets prepared here in array_record (PNG bytes, so no
TensorFlow is needed to write them), read back through input_pipeline and compared with the arrays
that were encoded."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax.config import DataConfig
from cnnjax.data import input_pipeline, store

CLASSES = ("cat", "dog", "bird")
COARSE = ("pet", "wild")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def arrays(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % len(CLASSES)


SPLITS = {"train": arrays(9, (4, 5, 3), 0), "test": arrays(4, (4, 5, 3), 1)}
GRAY = {"train": arrays(6, (4, 5, 1), 2), "test": arrays(3, (4, 5, 1), 3)}
SIZES = [(6, 7), (8, 5)] * 15  # a dataset of two image sizes and no test split
ODD = [np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8)
       for i, hw in enumerate(SIZES)]
ODD_LABELS = np.arange(len(ODD)) % len(CLASSES)


class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """RGB (the default config) or grayscale PNG images, a fine and a coarse ClassLabel."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rgb"), tfds.core.BuilderConfig(name="gray")]

    # TFDS's default looks for a checksums file beside this module (it needs importlib_resources).
    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        return {}

    def data(self):
        return GRAY if self.builder_config.name == "gray" else SPLITS

    def _info(self):
        channels = self.data()["train"][0].shape[-1]
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True, supervised_keys=("image", "label"),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 5, channels)),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "coarse": tfds.features.ClassLabel(names=COARSE)}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*self.data()[split]) for split in self.data()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": png(image), "label": int(label), "coarse": int(label == 2)}


class TinyV2(Tiny, skip_registration=True):
    """Version 2.0.0 of `tiny` (rgb only): the same images, inverted."""

    name = "tiny"
    VERSION = tfds.core.Version("2.0.0")

    def _generate_examples(self, images, labels):
        return super()._generate_examples(255 - images, labels)


class Sizes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images of two sizes, a train split only, and a feature that is not a ClassLabel."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = Tiny.url_infos

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,
            features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "width": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (image, label) in enumerate(zip(ODD, ODD_LABELS)):
            yield i, {"picture": png(image), "label": int(label), "width": image.shape[1]}


class Valid(Sizes, skip_registration=True):
    """A dataset with no train split."""

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builders = [Tiny(data_dir=root, config="rgb", file_format="array_record"),
                Tiny(data_dir=root, config="gray", file_format="array_record"),
                TinyV2(data_dir=root, config="rgb", file_format="array_record"),
                Sizes(data_dir=root, file_format="array_record"),
                Valid(data_dir=root, file_format="array_record")]
    with store.quiet():
        for builder in builders:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    # TFDS cannot write tfrecord without TensorFlow; what it writes for it differs in the info.
    shutil.copytree(root / "sizes", root / "records")
    info = root / "records" / "1.0.0" / "dataset_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "name": "records",
                                "fileFormat": "tfrecord"}))
    return root


def load(data_dir, dataset, split, **kwargs):
    return input_pipeline.load_split(DataConfig(dataset=dataset, data_dir=str(data_dir), **kwargs),
                                     split)


@pytest.mark.parametrize("dataset", ["tfds:tiny:1.0.0", "tfds:tiny/rgb:1.0.0"])
def test_pixels_and_labels_round_trip(data_dir, dataset):
    for split, (images, labels) in SPLITS.items():
        got_images, got_labels = load(data_dir, dataset, split)
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        assert not got_images.flags.writeable and not got_labels.flags.writeable
    assert "tensorflow" not in sys.modules


def test_latest_version_of_the_default_config(data_dir):
    images, _ = load(data_dir, "tfds:tiny", "test")
    np.testing.assert_array_equal(images, 255 - SPLITS["test"][0])


def test_grayscale_config(data_dir):
    images, labels = load(data_dir, "tfds:tiny/gray", "train")
    np.testing.assert_array_equal(images, GRAY["train"][0])
    np.testing.assert_array_equal(labels, GRAY["train"][1])


def test_spec_and_the_other_label(data_dir):
    cfg = DataConfig(dataset="tfds:tiny:1.0.0", data_dir=str(data_dir))
    spec = input_pipeline.dataset_spec(cfg)
    assert (spec.name, spec.num_classes, spec.class_names) == (cfg.dataset, 3, CLASSES)
    assert spec.image_shape == (4, 5, 3) and spec.splits == ("train", "test")
    assert not spec.needs_download
    assert (spec.mean, spec.std) == store.channel_stats(SPLITS["train"][0])
    coarse = DataConfig(dataset=cfg.dataset, data_dir=str(data_dir), label="coarse")
    assert input_pipeline.dataset_spec(coarse).class_names == COARSE
    _, labels = input_pipeline.load_split(coarse, "test")
    np.testing.assert_array_equal(labels, SPLITS["test"][1] == 2)


@pytest.mark.parametrize("image_size", [(4, 4), (4,)])
def test_no_test_split_is_a_stratified_holdout_of_resized_train(data_dir, image_size):
    resized = np.stack([store.resize(image, (4, 4)) for image in ODD])
    test = store.holdout(ODD_LABELS, 0.2)
    assert np.bincount(ODD_LABELS[test]).tolist() == [2, 2, 2]
    for split, rows in (("train", ~test), ("test", test)):
        images, labels = load(data_dir, "tfds:sizes", split, image_size=image_size)
        np.testing.assert_array_equal(images, resized[rows])
        np.testing.assert_array_equal(labels, ODD_LABELS[rows])


@pytest.mark.parametrize("dataset, kwargs, message", [
    ("tfds:sizes", {}, r"example 1 .* \(8, 5, 3\).*data.image_size=H,W"),
    ("tfds:nope", {}, r"no prepared TFDS dataset 'nope' in the data dir .*: tfds:records, "
                      r"tfds:sizes, tfds:tiny/gray, tfds:tiny/rgb, tfds:valid\."),
    ("tfds:tiny:3.0.0", {}, r"no version 3.0.0 .*tfds:tiny/rgb:1.0.0, tfds:tiny/rgb:2.0.0"),
    ("tfds:tiny/blue", {}, r"no config 'blue'; choose one of tfds:tiny/gray, tfds:tiny/rgb"),
    ("tfds:tiny:1.0", {}, r"not a TFDS dataset name"),
    ("tfds:records", {}, r"stored as tfrecord only.*tfds.builder\('records', data_dir=.*"
                         r"download_and_prepare\(file_format='array_record'\)"),
    ("tfds:valid", {}, r"no 'train' split \(its splits: validation\)"),
    ("tfds:sizes", {"label": "width"}, r"'width' is not a ClassLabel.*data.label=NAME: label"),
])
def test_errors_name_the_problem_and_the_fix(data_dir, dataset, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load(data_dir, dataset, "train", **kwargs)


@pytest.mark.parametrize("dataset, kwargs", [
    ("tfds:tiny:1.0.0", {"classes": (2, 0)}),
    ("tfds:sizes", {"image_size": (4, 4), "label": "label"}),  # no test split: the hold-out
])
def test_a_streamed_dataset_is_the_in_memory_one(data_dir, dataset, kwargs):
    """Read by index from the stored records: the same spec, splits and batches, labels read
    without decoding the images, statistics from one pass (cached in the data dir)."""
    cfg = DataConfig(dataset=dataset, data_dir=str(data_dir), val_fraction=0.25, **kwargs)
    memory = input_pipeline.open_data(cfg, seed=1)
    streamed = input_pipeline.open_data(DataConfig(**{**cfg.__dict__, "stream": "on"}), seed=1)
    try:
        assert isinstance(streamed, input_pipeline.Streamed) and streamed.spec == memory.spec
        for split in ("train", "val", "test"):
            images, labels = streamed.images(split)
            np.testing.assert_array_equal(np.asarray(images), memory.images(split)[0])
            np.testing.assert_array_equal(labels, memory.images(split)[1])
            batches = (streamed.eval_batches(split, 2), memory.eval_batches(split, 2))
            for ours, theirs in zip(*batches, strict=True):
                for key in theirs:
                    np.testing.assert_array_equal(ours[key], theirs[key])
        for ours, theirs in zip(streamed.train_batches(2, 1, 3), memory.train_batches(2, 1, 3),
                                strict=True):
            for key in theirs:
                np.testing.assert_array_equal(ours[key], theirs[key])
    finally:
        streamed.close()
    assert list((data_dir / "cnnjax_stream").glob("*/index.json"))
