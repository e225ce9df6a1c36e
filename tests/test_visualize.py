"""Seeing inside the CNN: each method checked against something it cannot fake.

Captured shapes against the output-size arithmetic; Integrated Gradients against its completeness
axiom; Grad-CAM and Grad-CAM++ against PyTorch forward/backward hooks on the same rectified layer;
saliency against the model-randomization sanity check (Adebayo et al., 2018); the localization,
saturation and spectrum checks against hand-made maps and images; filter health against a
hand-built dead filter and a plain NumPy recount; the report against a headless browser that must
decode every image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import Config, load_run, train_and_evaluate
from cnnjax.cli import main
from cnnjax.data.datasets import load
from cnnjax.nn.geometry import output_shape
from cnnjax.data.input_pipeline import load_data
from cnnjax.data.pixels import normalize
from cnnjax.nn.models import SeedCNN
from cnnjax.visualize import (ActMaxConfig, activation_maximization, attribution, capture, checks,
                              dead_filter_count, filter_health, list_layers)
from cnnjax.nn.capture import last_feature_layer, preactivation, rectified_feature_layer, top_level
from cnnjax.visualize.feature_maps import normalize_channels, tile

SMALL = ["model.kwargs.features=8,16", "model.kwargs.dense=32", "train.epochs=1", "train.progress=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz") / "run"
    train_and_evaluate(Config().override(SMALL), path)
    return path


@pytest.fixture(scope="module")
def trained(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def digits(trained):
    """The first test image of each class, normalized, and its label."""
    images, labels = load("mnist5k", "test")
    idx = np.array([np.flatnonzero(labels == c)[0] for c in range(10)])
    x = normalize(jnp.asarray(images[idx].reshape(-1, 28, 28, 1)), trained.spec.mean, trained.spec.std)
    return x, jnp.asarray(labels[idx])


def _bounds(spec):
    return ((0 - spec.mean) / spec.std, (1 - spec.mean) / spec.std)


# --- capture ------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, stride=1, padding=1, pool_size=2, pool_stride=None, image=(28, 28, 1)),
    dict(kernel_size=5, stride=1, padding="valid", pool_size=2, pool_stride=None, image=(28, 28, 1)),
    dict(kernel_size=3, stride=2, padding="same", pool_size=3, pool_stride=2, image=(32, 30, 3)),
])
def test_captured_maps_have_the_shapes_output_size_predicts(geometry):
    image = geometry.pop("image")
    model = SeedCNN(num_classes=10, features=(4, 6), dense=(8,), **geometry)
    x = jnp.zeros((2, *image))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    maps = jax.eval_shape(lambda v, x: capture(model, v, x), variables, x)  # shapes, no arithmetic
    k, s, p = geometry["kernel_size"], geometry["stride"], geometry["padding"]
    pool, pool_stride = geometry["pool_size"], geometry["pool_stride"] or geometry["pool_size"]
    hw = image[:2]
    for i, width in enumerate((4, 6), start=1):
        hw = output_shape(hw, k, s, p)
        assert maps[f"conv{i}"].shape == (2, *hw, width)
        hw = output_shape(hw, pool, pool_stride, 0)
        assert maps[f"pool{i}"].shape == (2, *hw, width)
    assert maps["fc1"].shape == (2, 8) and maps["logits"].shape == (2, 10)
    table = list_layers(model, variables, image)  # the listing the report shows, in call order
    assert [l.name for l in table] == ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "logits"]
    assert last_feature_layer(table) == "conv2"
    assert all(l.shape == maps[l.name].shape[1:] for l in table)


def test_capture_follows_batch_norm_and_names_unknown_layers():
    model = SeedCNN(num_classes=10, features=(4, 6), dense=(8,), batch_norm=True, dropout=0.5)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    table = list_layers(model, variables, (28, 28, 1))
    names = [l.name for l in table]
    assert names == ["conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "fc1", "fc2", "logits"]
    assert preactivation(table, "conv2").name == "bn2"  # the ReLU reads the norm's output
    assert last_feature_layer(table) == "bn2"  # act-max's default, not pool2
    # Grad-CAM's default is the map after bn2's ReLU: what pool2 reads
    with_inputs = list_layers(model, variables, (28, 28, 1), inputs=True)
    assert [l.name for l in with_inputs if l.kind == "input"] == ["pool1:in", "pool2:in"]
    assert rectified_feature_layer(with_inputs) == "pool2:in"
    relu_bn2 = jax.eval_shape(lambda v: capture(model, v, jnp.zeros((1, 28, 28, 1)),
                                                ["bn2", "pool2:in"]), variables)
    assert relu_bn2["pool2:in"].shape == relu_bn2["bn2"].shape == (1, 14, 14, 6)
    with pytest.raises(ValueError, match="no layer named 'conv3'.*conv1, bn1"):
        jax.eval_shape(lambda v: capture(model, v, jnp.zeros((1, 28, 28, 1)), ["conv3"]), variables)


def test_capture_and_grad_cam_reach_inside_a_resnet():
    from fixtures import TinyResNet

    model = TinyResNet(num_classes=10)
    x = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    table = list_layers(model, variables, (28, 28, 1))
    assert [l.name for l in top_level(table)] == ["conv1", "bn1", "layer1", "layer2", "layer3",
                                                  "layer4"]
    assert last_feature_layer(table) == "layer4"
    # a ResNet block ends in its ReLU: layer4's output is already the rectified map
    assert rectified_feature_layer(list_layers(model, variables, (28, 28, 1), inputs=True)) == "layer4"
    assert next(l for l in table if l.name == "layer4").shape == model.feature_shape((28, 28))
    assert preactivation(table, "layer2/0/conv1").name == "layer2/0/bn1"  # nested paths
    cam = jax.eval_shape(lambda v: attribution.grad_cam(model, v, x, jnp.array([0, 1]), "layer4"),
                         variables)
    assert cam.shape == (2, 28, 28)


def test_channel_grid_scales():
    fmap = np.stack([np.full((2, 2), 5.0), np.array([[0.0, 1.0], [2.0, 4.0]])], axis=-1)
    per_channel = normalize_channels(fmap, "channel")
    assert np.all(per_channel[..., 0] == 0)  # a flat (dead) channel is the bottom of the scale
    assert per_channel[..., 1].max() == 1.0 and per_channel[..., 1].min() == 0.0
    shared = normalize_channels(fmap, "shared")
    assert np.allclose(shared[..., 0], 1.0) and np.isclose(shared[1, 1, 1], 0.8)
    grid = tile(per_channel, cols=2)
    assert grid.shape == (2, 5) and np.isnan(grid[:, 2]).all()
    with pytest.raises(ValueError, match="colour scale"):
        normalize_channels(fmap, "global")


# --- activation maximization --------------------------------------------------------------------

def test_activation_maximization_raises_its_target_and_stays_readable(trained):
    model, variables, spec = trained.model, trained.variables, trained.spec
    cfg = ActMaxConfig(steps=64)
    lo, hi = _bounds(spec)
    conv = activation_maximization(model, variables, "conv2", spec.image_shape, jax.random.key(0),
                                   bounds=(lo, hi), cfg=cfg)
    assert conv.images.shape == (16, 28, 28, 1)
    assert conv.images.min() >= lo and conv.images.max() <= hi
    # the start is mid-grey, where most filters already respond: a gain, not a tenfold one
    gain = np.where(conv.start > 0, conv.final / np.maximum(conv.start, 1e-30), np.inf)
    assert np.median(gain[conv.final > 0]) >= 1.4, gain
    assert np.all(conv.final >= conv.start - 1e-6)  # none is driven down
    # the old pixel ascent ran most pixels to the bounds; the spectrum, sigmoid and L2 do not
    assert np.all(checks.saturation(conv.images, (lo, hi)) <= 0.1)
    classes = activation_maximization(model, variables, "logits", spec.image_shape,
                                      jax.random.key(0), bounds=(lo, hi), cfg=cfg)
    assert np.all(classes.final > classes.start + 1.0), (classes.start, classes.final)
    predicted = attribution.logits_fn(model, variables)(jnp.asarray(classes.images)).argmax(-1)
    assert np.array_equal(np.asarray(predicted), np.arange(10))  # each image is its class
    # one key stream per channel id: a channel alone gets the image it gets among the others
    alone = activation_maximization(model, variables, "conv2", spec.image_shape, jax.random.key(0),
                                    bounds=(lo, hi), channels=[5], cfg=cfg)
    np.testing.assert_allclose(alone.images[0], conv.images[5], atol=1e-4)
    with pytest.raises(ValueError, match=r"channels of 'conv2' must be .* \[0, 16\)"):
        activation_maximization(model, variables, "conv2", spec.image_shape, jax.random.key(0),
                                bounds=(lo, hi), channels=[16])


# --- attribution --------------------------------------------------------------------------------

def test_integrated_gradients_sum_to_the_logit_difference(trained, digits):
    x, labels = digits
    baseline = jnp.full_like(x, _bounds(trained.spec)[0])  # a black image

    @jax.jit
    def check(variables):
        fn = attribution.logits_fn(trained.model, variables)
        ig = attribution.integrated_gradients(fn, x, labels, baseline, steps=128)
        return attribution.completeness_gap(fn, x, labels, baseline, ig)

    total, diff = check(trained.variables)
    assert np.all(np.abs(np.asarray(diff)) > 1.0)  # a real gap to explain, not a 0/0
    np.testing.assert_array_less(np.abs(np.asarray(total - diff)), 0.01 * np.abs(np.asarray(diff)))


def test_saliency_fails_to_survive_model_randomization(trained, digits):
    x, labels = digits
    model = trained.model
    saliency = jax.jit(lambda v: attribution.heatmap(attribution.gradient(
        attribution.logits_fn(model, v), x, labels)))
    rng = np.random.default_rng(0)
    nudged = jax.tree.map(lambda p: p * (1 + 0.05 * rng.standard_normal(p.shape, np.float32)),
                          trained.variables["params"])
    trained_map = saliency(trained.variables)
    random_map = saliency(attribution.reinitialized(model, trained.variables, jax.random.key(123),
                                                    x[:1]))
    nudged_map = saliency({**trained.variables, "params": nudged})
    vs_random = np.mean([attribution.spearman(trained_map[i], random_map[i]) for i in range(10)])
    vs_nudged = np.mean([attribution.spearman(trained_map[i], nudged_map[i]) for i in range(10)])
    assert vs_random < 0.5, vs_random  # the explanation depends on what the model learned
    assert vs_nudged > 0.8, vs_nudged  # while the metric does see agreement where there is some


def test_grad_cam_matches_pytorch_hooks_on_the_rectified_layer(trained, digits):
    """pytorch-grad-cam's recipe on a torch copy of the model: a forward hook keeps the target
    layer's output, a backward hook its gradient, on the ReLU after conv2."""
    torch = pytest.importorskip("torch")
    x, _ = digits
    x = x[:3]
    targets = jnp.array([0, 1, 7])
    model = trained.model
    layer = rectified_feature_layer(list_layers(model, trained.variables, (28, 28, 1), inputs=True))
    assert layer == "pool2:in"  # ReLU(conv2), what pool2 reads
    cams = jax.jit(lambda v: {m: attribution.grad_cam(model, v, x, targets, layer, m)
                              for m in attribution.CAM_METHODS})(trained.variables)

    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), trained.variables["params"])

    def pool(t):
        """2x2 max pool whose gradient ties share equally (torch's amax), as cnnjax's pool and
        jax's max do; max_pool2d hands a tie's gradient to one input, which Grad-CAM's mean
        over positions does not see and Grad-CAM++'s per-position weights do."""
        n, c, h, w = t.shape
        return t.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = (torch.nn.Conv2d(i, o, 3, padding=1) for i, o in ((1, 8), (8, 16)))
            self.relu1, self.relu2 = torch.nn.ReLU(), torch.nn.ReLU()
            self.fc1, self.fc2 = torch.nn.Linear(7 * 7 * 16, 32), torch.nn.Linear(32, 10)
            with torch.no_grad():
                for name in ("conv1", "conv2"):
                    getattr(self, name).weight.copy_(p[name]["kernel"].permute(3, 2, 0, 1))
                    getattr(self, name).bias.copy_(p[name]["bias"])
                for name in ("fc1", "fc2"):
                    getattr(self, name).weight.copy_(p[name]["kernel"].T)
                    getattr(self, name).bias.copy_(p[name]["bias"])

        def forward(self, t):
            t = pool(self.relu1(self.conv1(t)))
            t = pool(self.relu2(self.conv2(t)))
            t = t.permute(0, 2, 3, 1).flatten(1)  # NHWC order, as the Flax model flattens
            return self.fc2(torch.relu(self.fc1(t)))

    net, kept = Net(), {}
    net.relu2.register_forward_hook(lambda m, i, o: kept.update(a=o.detach()))
    net.relu2.register_full_backward_hook(lambda m, gi, go: kept.update(g=go[0].detach()))
    logits = net(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2))
    logits[torch.arange(3), torch.tensor(np.asarray(targets))].sum().backward()
    a, g = kept["a"].numpy().astype(np.float64), kept["g"].numpy().astype(np.float64)
    g2 = g ** 2
    alpha = np.where(g != 0, g2 / (2 * g2 + a.sum(axis=(2, 3))[:, :, None, None] * g2 * g + 1e-6), 0)
    weights = {"gradcam": g.mean(axis=(2, 3)), "gradcam++": (np.maximum(g, 0) * alpha).sum(axis=(2, 3))}
    for method, w in weights.items():
        ref = torch.relu(torch.tensor((w[:, :, None, None] * a).sum(1, keepdims=True)))
        ref = torch.nn.functional.interpolate(ref, size=(28, 28), mode="bilinear",
                                              align_corners=False)[:, 0].numpy()
        assert ref.max() > 0, method  # a map to compare, not two zeros
        np.testing.assert_allclose(np.asarray(cams[method]), ref, rtol=1e-3,
                                   atol=1e-4 * ref.max(), err_msg=method)  # float32 sums differ


def test_grad_cam_on_the_rectified_map_lands_on_the_digits(trained):
    images, _ = load("mnist5k", "test")
    pixels = images[:20].reshape(-1, 28, 28, 1)
    x = normalize(jnp.asarray(pixels), trained.spec.mean, trained.spec.std)
    model = trained.model

    @jax.jit
    def cam(v):
        return attribution.grad_cam(model, v, x, attribution.logits_fn(model, v)(x).argmax(-1),
                                    "pool2:in")

    found = checks.localization(np.asarray(cam(trained.variables)), checks.stroke_mask(pixels / 255))
    assert found.pointing >= 0.9 and found.mass > found.uniform_mass + 0.15, found


# --- filter health ------------------------------------------------------------------------------

def test_a_hand_built_dead_filter_is_flagged_and_a_live_one_is_not(trained):
    model, spec = trained.model, trained.spec
    images = load_data(trained.config.data, trained.config.train.seed).val[0]  # 800: 500 + 300
    params = jax.tree.map(np.array, trained.variables["params"])
    params["conv1"]["kernel"][..., 0] = 0.0
    params["conv1"]["bias"][0] = -1.0  # pre-activation -1 everywhere: its ReLU never passes
    broken = {"params": params, "batch_stats": trained.variables["batch_stats"]}
    health = filter_health(model, broken, images, spec.mean, spec.std)  # last batch padded
    conv1 = health["conv1"]
    assert 0 in conv1.dead and conv1.dead_fraction[0] == 1.0 and conv1.mean_activation[0] == 0.0
    assert 1 not in conv1.dead and conv1.mean_activation[1] > 0
    # the batched, padded, masked sums agree with a plain recount on all images at once
    x = normalize(jnp.asarray(images), spec.mean, spec.std)
    z = np.asarray(jax.jit(lambda v: capture(model, v, x, ["conv2"])["conv2"])(broken))
    np.testing.assert_allclose(health["conv2"].dead_fraction, (z <= 0).mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(health["conv2"].mean_activation, np.maximum(z, 0).mean(axis=(0, 1, 2)),
                               rtol=1e-3)  # float32 sums in another order
    np.testing.assert_allclose(health["conv2"].max_preactivation, z.max(axis=(0, 1, 2)), rtol=1e-5)
    assert dead_filter_count(model, broken, images, spec) == sum(len(h.dead) for h in health.values())


# --- the command and its report -----------------------------------------------------------------

@pytest.fixture(scope="module")
def report(run_dir):
    assert main(["visualize", "--run", str(run_dir), "--images", "0", "500", "--layer", "conv2",
                 "logits", "--actmax-steps", "64", "--recognizer", str(run_dir)]) == 0
    return run_dir / "report.html"


def test_visualize_writes_a_self_contained_report(report, run_dir):
    out = run_dir / "visualize"
    for name in ("overview_0.png", "overview_1.png", "maps_0_conv2.png", "actmax_conv2.png",
                 "actmax_logits.png", "attribution.png", "filter_health.png", "filter_health.json",
                 "actmax.json", "attribution.json", "checks.json"):
        assert (out / name).exists(), name
    found = json.loads((out / "checks.json").read_text())
    loc = found["localization"]
    assert loc["layer"] == "pool2:in" and loc["images"] == 100
    assert loc["gradcam"]["mass"] > loc["gradcam"]["uniform_mass"]
    assert found["actmax"]["layers"]["conv2"]["images_at_most_10pct"] == 16
    assert found["actmax"]["recognized"]["recognized"] == 10  # the run as its own recognizer
    html = report.read_text()
    assert "pointing game" in html and "high-frequency share" in html and "Grad-CAM++" in html
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) >= 10 and all(s.startswith("data:image/png;base64,") for s in sources)
    health = json.loads((out / "filter_health.json").read_text())
    assert set(health["layers"]) == {"conv1", "conv2"} and health["split"] == "val"
    ig = json.loads((out / "attribution.json").read_text())
    assert max(ig["ig_relative_gap"]) < 0.01
    assert main(["visualize", "--run", str(run_dir), "--layer", "conv9"]) == 2  # named, not a trace
    assert main(["visualize", "--run", str(run_dir), "--cam-layer", "fc1"]) == 2  # not spatial


def test_the_report_shows_the_runs_calibration_binned_by_hand(report, run_dir, trained):
    found = json.loads((run_dir / "visualize" / "checks.json").read_text())["calibration"]
    images, labels = load("mnist5k", "test")
    z = trained.logits(images).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, right = p.max(1), p.argmax(1) == labels
    gaps = 0.0
    for lo in range(15):  # [k/15, (k+1)/15), the last bin closed
        inside = (confidence >= lo / 15) & ((confidence < (lo + 1) / 15) | (lo == 14))
        if inside.any():
            gaps += inside.sum() * abs(right[inside].mean() - confidence[inside].mean())
    assert found["split"] == "test" and sum(found["count"]) == len(labels) == 1000
    assert found["ece"] == pytest.approx(gaps / len(labels), abs=1e-6)
    assert (run_dir / "visualize" / "reliability.png").exists()
    assert "Expected calibration error" in report.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    import matplotlib.image

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    url = report.resolve().as_uri()
    dom = subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'dom'}", "--dump-dom",
                          url], capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', body).group(1))
    assert total >= 10 and loaded == total
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / 'shot'}",
                    f"--screenshot={shot}", "--window-size=1280,3000", url],
                   capture_output=True, timeout=120, check=True)
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1280) and pixels[..., :3].std() > 0.05  # not a blank page
