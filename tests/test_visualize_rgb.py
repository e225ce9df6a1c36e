"""The pictures of a colour run, checked against what a colour image is: act-max tiles are the
optimized RGB images (not their channel mean), the overview's input panel holds the input's own
colours, attribution maps keep the input's three channels, and the report runs end to end.

One tiny SeedCNN on 16x16x3 images whose class is their dominant colour, trained once per module.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import PIL.Image
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import cnnjax
from cnnjax.cli import main
from cnnjax.data.pixels import normalize
from cnnjax.visualize import ActMaxConfig, activation_maximization, attribution, feature_maps
from cnnjax.visualize.actmax import ActMaxResult, actmax_grid, pixel_bounds
from cnnjax.visualize.feature_maps import colorize, tile
from cnnjax.visualize.html_report import data_uri
from cnnjax.visualize.run_report import read_image_file

SHAPE = (16, 16, 3)
SMALL = ["model.kwargs.features=4,8", "model.kwargs.dense=16", "train.epochs=1", "train.batch_size=32",
         "train.progress=false"]


def _colour_dataset(n_train=256, n_test=64, seed=0):
    """3 classes of 16x16 noise: class k is bright in channel k (red, green, blue)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, *SHAPE))
        images[np.arange(n), :, :, labels] += 150
        return images.astype(np.uint8), labels
    return {"train": split(n_train), "test": split(n_test)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cnnjax.register_dataset("test_viz_rgb16", _colour_dataset())
    path = tmp_path_factory.mktemp("viz_rgb") / "run"
    cnnjax.train_and_evaluate(cnnjax.Config().override(["data.dataset=test_viz_rgb16", *SMALL]), path)
    return path


@pytest.fixture(scope="module")
def trained(run_dir):
    return cnnjax.load_run(run_dir)


def _rendered(fig) -> np.ndarray:
    """The figure as (H, W, 3) floats in [0, 1], top row first, as the PNG would hold it."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3] / 255.0


def _panel(fig, pixels: np.ndarray, ax) -> np.ndarray:
    """The pixels of `ax`'s first image, cropped 2 px inside its edges (no anti-aliased border)."""
    box = ax.images[0].get_window_extent()
    height = pixels.shape[0]
    top, bottom = int(np.ceil(height - box.y1)) + 2, int(height - box.y0) - 2
    left, right = int(np.ceil(box.x0)) + 2, int(box.x1) - 2
    return pixels[top:bottom, left:right]


# --- act-max ------------------------------------------------------------------------------------

def test_an_rgb_actmax_grid_holds_each_image_per_channel_and_grey_keeps_its_formula():
    rng = np.random.default_rng(1)
    lo, hi = (-1.0, -2.0, 0.0), (1.0, 2.0, 4.0)  # a different range per channel
    images = rng.uniform(lo, hi, (3, 4, 5, 3)).astype(np.float32)
    grid = actmax_grid(ActMaxResult("logits", np.arange(3), images, np.zeros(3), np.zeros(3),
                                    (lo, hi)))
    assert grid.shape == (2 * 5 - 1, 2 * 6 - 1, 4) and np.all(grid[..., 3] == 255)
    for k in range(3):
        r, q = divmod(k, 2)
        expected = np.round(255 * (images[k] - np.array(lo)) / (np.array(hi) - np.array(lo)))
        np.testing.assert_allclose(grid[5 * r:5 * r + 4, 6 * q:6 * q + 5, :3], expected, atol=1)
    assert np.all(grid[4, :, :3] == 128) and np.all(grid[5:, 6:, :3] == 128)  # gaps, empty tile 4
    grey = rng.uniform(-0.4, 2.8, (5, 6, 6, 1)).astype(np.float32)
    one = ActMaxResult("conv2", np.arange(5), grey, np.zeros(5), np.zeros(5), (-0.4, 2.8))
    old = colorize(tile((np.moveaxis(grey.mean(axis=-1), 0, -1) - -0.4) / (2.8 - -0.4)), "gray",
                   gap=0.5)
    np.testing.assert_array_equal(actmax_grid(one), old)  # 1-channel output unchanged


def test_actmax_on_a_colour_model_keeps_each_channel_in_its_range_and_shows_rgb(trained):
    spec = trained.spec
    bounds = pixel_bounds(spec.mean, spec.std)
    assert len(bounds[0]) == 3 and bounds[0] != bounds[1]  # per channel: the stats differ
    # the report's act-max settings (`--actmax-steps 8`): one compiled program serves both
    result = activation_maximization(trained.model, trained.variables, "logits", SHAPE,
                                     jax.random.key(0), bounds=bounds, cfg=ActMaxConfig(steps=8))
    assert result.images.shape == (3, *SHAPE)
    # the reference undoes normalize: pixel = x * std + mean, in [0, 1] per channel
    pixels = result.images * np.asarray(spec.std) + np.asarray(spec.mean)
    assert pixels.min() >= 0 and pixels.max() <= 1
    grid = actmax_grid(result)
    assert grid.shape == (33, 33, 4)
    for k in range(3):
        r, q = divmod(k, 2)
        np.testing.assert_allclose(grid[17 * r:17 * r + 16, 17 * q:17 * q + 16, :3],
                                   np.round(255 * pixels[k]), atol=1)
    spread = np.ptp(grid[:16, :16, :3].astype(int), axis=-1)
    assert spread.max() > 10  # colour, not a channel mean drawn in grey


# --- feature maps -------------------------------------------------------------------------------

def test_the_overview_shows_the_input_in_its_own_colours():
    image = np.zeros(SHAPE)
    image[:, :8, 0] = 1.0  # left half pure red
    image[:, 8:, 2] = 1.0  # right half pure blue
    maps = {"conv1": np.random.default_rng(0).random((16, 16, 4)), "pool1": np.ones((8, 8, 4))}
    fig = feature_maps.overview_figure(image, maps, title="red | blue", max_channels=4)
    panel = _panel(fig, _rendered(fig), fig.axes[0])
    third = panel.shape[1] // 3
    red, blue = panel[:, :third], panel[:, -third:]
    assert red[..., 0].min() > 0.9 and red[..., 1:].max() < 0.1, red.mean(axis=(0, 1))
    assert blue[..., 2].min() > 0.9 and blue[..., :2].max() < 0.1, blue.mean(axis=(0, 1))


# --- attribution --------------------------------------------------------------------------------

def test_attributions_of_colour_images_keep_three_channels_and_render_over_grey(trained):
    images, labels = _colour_dataset()["test"]
    idx = np.array([np.flatnonzero(labels == c)[0] for c in range(3)])
    pixels = images[idx]
    x = normalize(jnp.asarray(pixels), trained.spec.mean, trained.spec.std)
    black = normalize(jnp.zeros_like(jnp.asarray(pixels)), trained.spec.mean, trained.spec.std)
    baseline = jnp.broadcast_to(jnp.asarray(pixel_bounds(trained.spec.mean, trained.spec.std)[0],
                                            jnp.float32), x.shape)
    np.testing.assert_allclose(baseline, black, rtol=1e-6)  # the report's baseline is black
    model, targets = trained.model, jnp.asarray(labels[idx])

    @jax.jit
    def explain(v):
        fn = attribution.logits_fn(model, v)
        ig = attribution.integrated_gradients(fn, x, targets, baseline, steps=64)
        return {"gradient": attribution.gradient(fn, x, targets), "ig": ig,
                "gap": attribution.completeness_gap(fn, x, targets, baseline, ig)}

    r = jax.device_get(explain(trained.variables))  # SmoothGrad and Grad-CAM: the report's test
    assert r["gradient"].shape == r["ig"].shape == (3, *SHAPE)
    total, diff = r["gap"]
    np.testing.assert_array_less(np.abs(total - diff), 0.02 * np.abs(diff) + 1e-4)
    folded = np.asarray(attribution.heatmap(r["gradient"]))
    np.testing.assert_array_equal(folded, np.abs(r["gradient"]).max(axis=-1))
    display = pixels / 255.0
    fig = attribution.overlay_figure(display, {"gradient": folded,
                                               "IG": attribution.heatmap(r["ig"])},
                                     ["red", "green", "blue"])
    rendered = _rendered(fig)
    axes = np.asarray(fig.axes).reshape(3, 3)
    for c in range(3):
        shown = _panel(fig, rendered, axes[c, 0]).mean(axis=(0, 1))
        assert shown.argmax() == c and shown[c] > shown.min() + 0.3, (c, shown)  # RGB input
        under = axes[c, 1].images[0].get_array()
        np.testing.assert_allclose(under, display[c].mean(axis=-1))  # the overlay's grey base


# --- the command and its report -----------------------------------------------------------------

def test_png_files_are_read_as_the_colour_model_takes_them(tmp_path):
    green = np.zeros((*SHAPE[:2], 3), np.uint8)
    green[..., 1] = 200
    matplotlib.image.imsave(tmp_path / "green.png", green)
    np.testing.assert_array_equal(read_image_file(tmp_path / "green.png", SHAPE), green[None])
    ramp = np.tile(np.arange(16, dtype=np.uint8)[None] * 16, (16, 1))
    PIL.Image.fromarray(ramp).save(tmp_path / "ramp.png")  # a 1-channel ('L') PNG
    read = read_image_file(tmp_path / "ramp.png", SHAPE)
    assert read.shape == (1, *SHAPE)
    np.testing.assert_array_equal(read[0], np.repeat(ramp[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read_image_file(tmp_path / "green.png", (16, 16, 1))[0, ..., 0],
                                  np.full((16, 16), round(200 / 3)))


def test_visualize_writes_the_report_of_a_colour_run(run_dir, tmp_path):
    blue = np.zeros((*SHAPE[:2], 3), np.uint8)
    blue[..., 2] = 220
    matplotlib.image.imsave(tmp_path / "blue.png", blue)
    assert main(["visualize", "--run", str(run_dir), "--images", "0", str(tmp_path / "blue.png"),
                 "--layer", "logits", "--actmax-steps", "8"]) == 0
    out, html = run_dir / "visualize", (run_dir / "report.html").read_text()
    written = ["overview_0.png", "overview_1.png", "actmax_logits.png", "attribution.png",
               "filter_health.png"]
    for name in written:
        assert data_uri(out / name) in html, name  # each picture, inlined
    for name in ("actmax.json", "attribution.json", "checks.json", "filter_health.json"):
        assert (out / name).exists(), name
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) >= len(written)
    assert "blue.png" in html and "no stroke mask" in html
    grid = matplotlib.image.imread(out / "actmax_logits.png")
    assert grid.shape == (33, 33, 4) and np.ptp(grid[:16, :16, :3], axis=-1).max() > 0.04
    checks = json.loads((out / "checks.json").read_text())
    assert checks["actmax"]["layers"]["logits"]["images"] == 3
    ig = json.loads((out / "attribution.json").read_text())
    assert len(ig["targets"]) == 2 and max(ig["ig_relative_gap"]) < 0.01
