"""`imagefolder:PATH` against Pillow: folders of PNG and JPEG files written here, read back through
the input pipeline; the split rule, the resize rule, re-preparation, every bad-input error, and a
1-epoch training run."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import cnnjax
from cnnjax.config import DataConfig
from cnnjax.data import imagefolder, input_pipeline, store


def _write(path: pathlib.Path, pixels: np.ndarray, mode: str | None = None) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


def _pixels(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _cfg(root, data_dir, **kwargs) -> DataConfig:
    return DataConfig(dataset=imagefolder.PREFIX + str(root), data_dir=str(data_dir), **kwargs)


def _colour_folder(root: pathlib.Path, rng, size=(6, 5)) -> dict[str, list]:
    """train/ and test/, classes 'zebra' and 'ant' (so sorting matters), PNG RGB, RGBA, grayscale
    and palette files and JPEGs; returns split -> [(path, label, expected pixels)] in sorted order."""
    h, w = size
    expected = {"train": [], "test": []}
    for split, n in (("train", 3), ("test", 2)):
        for label, name in enumerate(("ant", "zebra")):
            d = root / split / name
            for i in range(n):
                rgb = _pixels(rng, (h, w, 3))
                expected[split].append((_write(d / f"{i}_rgb.png", rgb), label, rgb))
            gray = _pixels(rng, (h, w))
            expected[split].append((_write(d / "g_gray.png", gray), label,
                                    np.repeat(gray[..., None], 3, axis=-1)))
            rgba = _pixels(rng, (h, w, 4))
            expected[split].append((_write(d / "r_rgba.png", rgba), label, rgba[..., :3]))
            pal = _write(d / "p_palette.png", _pixels(rng, (h, w, 3)), "P")
            expected[split].append((pal, label, np.asarray(Image.open(pal).convert("RGB"))))
            jpg = _write(d / "sub" / "photo.JPG", _pixels(rng, (h, w, 3)))
            expected[split].append((jpg, label, np.asarray(Image.open(jpg).convert("RGB"))))
            (d / ".DS_Store").write_bytes(b"\0junk")
            _write(d / ".hidden" / "x.png", _pixels(rng, (h, w, 3)))
        (root / split / "README.txt").write_text("files beside class folders are left alone")
    for split in expected:
        expected[split].sort(key=lambda e: (e[1], e[0]))
    return expected


def test_split_folders_round_trip_labels_pixels_and_class_names(tmp_path):
    expected = _colour_folder(tmp_path / "data", np.random.default_rng(0))
    cfg = _cfg(tmp_path / "data", tmp_path / "tfds")
    for split, rows in expected.items():
        images, labels = input_pipeline.load_split(cfg, split)
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        assert not images.flags.writeable
        np.testing.assert_array_equal(labels, [label for _, label, _ in rows])
        for image, (path, _, pixels) in zip(images, rows, strict=True):
            np.testing.assert_array_equal(image, pixels, err_msg=str(path))
    spec = input_pipeline.dataset_spec(cfg)
    train = np.stack([p for _, _, p in expected["train"]]).reshape(-1, 3) / 255.0
    assert (spec.name, spec.num_classes, spec.class_names) == (cfg.dataset, 2, ("ant", "zebra"))
    assert spec.image_shape == (6, 5, 3) and spec.splits == ("train", "test")
    assert not spec.needs_download
    np.testing.assert_allclose(spec.mean, train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(spec.std, train.std(0), rtol=1e-12)


def test_a_grayscale_folder_has_one_channel(tmp_path):
    rng = np.random.default_rng(1)
    written = {c: [_pixels(rng, (4, 4)) for _ in range(5)] for c in ("a", "b")}
    for c, arrays in written.items():
        for i, a in enumerate(arrays):
            _write(tmp_path / "data" / c / f"{i}.png", a)
    cfg = _cfg(tmp_path / "data", tmp_path / "tfds", test_fraction=0.4)
    images, labels = input_pipeline.load_split(cfg, "train")
    assert images.shape == (6, 4, 4, 1)
    truth = {(c, a.tobytes()) for c, arrays in written.items() for a in arrays}
    assert {("ab"[y], x[..., 0].tobytes()) for x, y in zip(images, labels)} <= truth


def test_class_folders_alone_get_a_stratified_test_split_fixed_by_the_data(tmp_path):
    rng = np.random.default_rng(2)
    counts = {"cat": 10, "dog": 5, "emu": 7}
    written = set()
    for c, n in counts.items():
        for i in range(n):
            a = _pixels(rng, (3, 3, 3))
            written.add(a.tobytes())
            _write(tmp_path / "data" / c / f"{i:02d}.png", a)
    cfg = _cfg(tmp_path / "data", tmp_path / "tfds", test_fraction=0.3)
    (x_train, y_train), (x_test, y_test) = (input_pipeline.load_split(cfg, s) for s in ("train", "test"))
    expected_test = [round(0.3 * n) for n in counts.values()]  # 3, 2 (1.5 rounds to even), 2
    assert np.bincount(y_test).tolist() == expected_test
    assert np.bincount(y_train).tolist() == [n - t for n, t in zip(counts.values(), expected_test)]
    rows = [x.tobytes() for x in np.concatenate([x_train, x_test])]
    assert len(set(rows)) == len(rows) and set(rows) == written
    # Prepared afresh elsewhere, and in runs of other seeds: the same split.
    again = input_pipeline.load_split(_cfg(tmp_path / "data", tmp_path / "tfds2",
                                           test_fraction=0.3), "test")
    np.testing.assert_array_equal(again[0], x_test)
    seeded = [input_pipeline.load_data(cfg, seed).test for seed in (0, 1)]
    for images, labels in seeded:
        np.testing.assert_array_equal(images, x_test)
        np.testing.assert_array_equal(labels, y_test)


def test_image_size_resizes_like_pillow_and_odd_sizes_without_it_are_named(tmp_path):
    rng = np.random.default_rng(3)
    files = [_write(tmp_path / "data" / "a" / "0.png", _pixels(rng, (6, 6, 3))),
             _write(tmp_path / "data" / "a" / "1.jpg", _pixels(rng, (9, 7, 3))),
             _write(tmp_path / "data" / "b" / "0.png", _pixels(rng, (4, 11))),
             _write(tmp_path / "data" / "b" / "1.png", _pixels(rng, (6, 6, 3)))]
    for size, hw in (((5, 4), (5, 4)), ((6,), (6, 6))):
        cfg = _cfg(tmp_path / "data", tmp_path / "tfds", image_size=size, test_fraction=0.5)
        images = np.concatenate([input_pipeline.load_split(cfg, s)[0] for s in ("train", "test")])
        assert images.shape == (4, *hw, 3)
        reference = []
        for f in files:
            im = Image.open(f).convert("RGB")
            reference.append(np.asarray(im if im.size == hw[::-1] else
                                        im.resize(hw[::-1], Image.Resampling.BICUBIC)).tobytes())
        assert sorted(x.tobytes() for x in images) == sorted(reference)
    with pytest.raises(ValueError, match=r"a/1\.jpg is 9x7 .*but .*a/0\.png is 6x6.*data\.image_size=H,W"):
        input_pipeline.load_split(_cfg(tmp_path / "data", tmp_path / "tfds", test_fraction=0.5),
                                  "train")


def test_a_changed_folder_is_prepared_again_and_an_unchanged_one_is_not(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    for c in ("a", "b"):
        for i in range(2):
            _write(tmp_path / "data" / "train" / c / f"{i}.png", _pixels(rng, (3, 3, 3)))
        _write(tmp_path / "data" / "test" / c / "0.png", _pixels(rng, (3, 3, 3)))
    cfg = _cfg(tmp_path / "data", tmp_path / "tfds")
    assert len(input_pipeline.load_split(cfg, "train")[1]) == 4
    assert input_pipeline.dataset_spec(cfg).num_classes == 2

    def refuse(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(imagefolder.CnnjaxImageFolder, "download_and_prepare", refuse)
    monkeypatch.setattr(store, "_cache", {})  # as a new process would start
    assert len(input_pipeline.load_split(cfg, "train")[1]) == 4
    monkeypatch.undo()

    added = _write(tmp_path / "data" / "train" / "b" / "2.png", _pixels(rng, (3, 3, 3)))
    images, labels = input_pipeline.load_split(cfg, "train")
    assert labels.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(images[-1], np.asarray(Image.open(added)))
    assert input_pipeline.dataset_spec(cfg).mean == store.channel_stats(images)[0]
    assert len(list((tmp_path / "tfds" / "cnnjax_imagefolder").iterdir())) == 1


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes(np.zeros((2, 2, 3), np.uint8))
BIG = _png_bytes(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
# Each bad folder, as relative path -> bytes ('.': PATH itself is a file), and its error.
BAD_FOLDERS = {
    "missing": ({}, FileNotFoundError, "does not exist"),
    "a file": ({".": b"x"}, ValueError, "is not a folder"),
    "no class folders": ({"README.txt": b"hi"}, ValueError, "holds no class folders"),
    "image outside classes": ({"a/0.png": PNG, "x.png": PNG}, ValueError,
                              r"x\.png is outside any class folder"),
    "empty class": ({"a/0.png": PNG, "b/.DS_Store": b""}, ValueError,
                    r"class folder .*/b holds no images"),
    "not an image": ({"a/0.png": PNG, "a/notes.txt": b"hi"}, ValueError,
                     r"a/notes\.txt is not a PNG or JPEG"),
    "garbage": ({"a/0.png": PNG, "a/1.png": b"not a png"}, ValueError,
                r"a/1\.png cannot be read as an image"),
    "truncated": ({"a/0.png": BIG, "a/1.png": BIG[:len(BIG) // 2]}, ValueError,
                  r"a/1\.png cannot be decoded"),
    "16-bit": ({"a/0.png": PNG, "a/1.png": _png_bytes(np.zeros((2, 2), np.uint16))}, ValueError,
               r"a/1\.png is a mode-I;16 image"),
    "classes differ": ({"train/a/0.png": PNG, "train/b/0.png": PNG, "test/a/0.png": PNG,
                        "test/c/0.png": PNG}, ValueError,
                       r"only in train/: \['b'\], only in test/: \['c'\]"),
    "no test folder": ({"train/a/0.png": PNG}, ValueError, r"add .*/test/"),
    "beside train/test": ({"train/a/0.png": PNG, "test/a/0.png": PNG, "val/a/0.png": PNG},
                          ValueError, r"move val out of it"),
    "too few images": ({"a/0.png": PNG}, ValueError, "leaves an empty split"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folders_get_one_clear_error_and_prepare_nothing(tmp_path, case):
    layout, error, pattern = BAD_FOLDERS[case]
    root = tmp_path / "data"
    for rel, data in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    cfg = _cfg(root, tmp_path / "tfds", test_fraction=0.5)
    with pytest.raises(error, match=pattern):
        input_pipeline.load_split(cfg, "train")
    with pytest.raises(error, match=pattern):
        input_pipeline.dataset_spec(cfg)
    assert not list(tmp_path.glob("tfds/cnnjax_imagefolder/*/*/dataset_info.json"))


def test_a_label_or_an_unknown_split_is_refused(tmp_path):
    _write(tmp_path / "data" / "a" / "0.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="data.label='coarse' does not apply"):
        input_pipeline.dataset_spec(_cfg(tmp_path / "data", tmp_path, label="coarse"))
    with pytest.raises(ValueError, match="no split 'val'"):
        input_pipeline.load_split(_cfg(tmp_path / "data", tmp_path), "val")
    with pytest.raises(ValueError, match="names no folder"):
        input_pipeline.load_split(DataConfig(dataset="imagefolder:"), "train")


def test_cnnjax_trains_on_a_folder_of_colour_images(tmp_path):
    rng = np.random.default_rng(5)
    for split, n in (("train", 20), ("test", 6)):
        for label, name in enumerate(("dark", "light")):
            for i in range(n):
                base = 40 + 160 * label
                pixels = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                _write(tmp_path / "data" / split / name / f"{i}.{'png' if i % 2 else 'jpg'}", pixels)
    cfg = cnnjax.Config().override([
        f"data.dataset=imagefolder:{tmp_path / 'data'}", f"data.data_dir={tmp_path / 'tfds'}",
        "model.kwargs.features=4", "model.kwargs.dense=8", "train.epochs=1", "train.batch_size=8",
        "train.eval_batch_size=16", "train.progress=false"])
    result = cnnjax.train_and_evaluate(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["count"] == result.summary["test"]["count"] == 12
    spec = json.loads((tmp_path / "run" / "data_spec.json").read_text())["spec"]
    assert spec["image_shape"] == [8, 8, 3] and spec["class_names"] == ["dark", "light"]
