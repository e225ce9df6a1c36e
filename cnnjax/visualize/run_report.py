"""`visualize_run`: everything this package draws for one trained run, gathered in one report.html.

Reads the run directory alone (config.json, best checkpoint, summary.json, training plots); writes
PNGs and JSON under <run>/visualize/ and a self-contained <run>/report.html. All randomness
(act-max starts and jitter, SmoothGrad noise, the re-initialized model of the sanity check) comes
from one key, `seed` (default: the run's training seed), split once per use.
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.data import input_pipeline
from cnnjax.data.pixels import normalize
from cnnjax.report import logs as report
from cnnjax.training.runs import Run, load_run
from cnnjax.visualize import attribution, checks, feature_maps, html_report as H
from cnnjax.visualize.actmax import (ActMaxConfig, activation_maximization, actmax_grid, in_units,
                                     pixel_bounds)
from cnnjax.nn.capture import (LOGITS, Layer, capture, inference_variables, last_feature_layer,
                               list_layers, rectified_feature_layer, top_level)
from cnnjax.nn.health import filter_health
from cnnjax.report.plots import plot_run, save_figure
from cnnjax.visualize.filter_health import health_figure
from cnnjax.training import calibration
from cnnjax.training.ensemble import softmax
from cnnjax.visualize.calibration import reliability_figure

DEFAULT_IMAGES = 4  # the first test image of each of the first classes
LOCALIZATION_IMAGES = 100  # the first test images, over which Grad-CAM's localization is measured
CURVES = ("loss.png", "accuracy.png", "learning_rate.png", "grad_norm.png", "confusion_matrix.png")
OUT_DIR = "visualize"
REPORT = "report.html"


def read_image_file(path: pathlib.Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy (uint8, one image or a batch) or .png file as uint8 (N, H, W, C) for the model; a
    colour PNG for a 1-channel model is averaged, a grey one for a 3-channel model repeated."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} not found; --images takes test-set indices or "
                                f".npy/.png paths.")
    if path.suffix.lower() == ".npy":
        pixels = np.load(path)
    elif path.suffix.lower() == ".png":
        import matplotlib.image

        pixels = matplotlib.image.imread(path)  # floats in [0, 1]: (H, W) grey or (H, W, 3|4)
        if pixels.ndim == 3:
            pixels = pixels[..., :3]  # alpha dropped
            if image_shape[-1] == 1:
                pixels = pixels.mean(axis=-1)
        elif image_shape[-1] == 3:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        pixels = np.round(pixels * 255).astype(np.uint8)
    else:
        raise ValueError(f"image file {path}: expected .npy or .png.")
    if pixels.ndim in (2, 3) and pixels.shape[:2] == tuple(image_shape[:2]):
        pixels = pixels[None]
    return input_pipeline.as_nhwc(pixels, tuple(image_shape))


def test_set(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split (its classes, as in training): (N, H, W, C) images in pixel units
    and their labels."""
    cfg = run.config.data
    images, labels = input_pipeline.load_split(cfg, "test")
    return input_pipeline.select_classes(images, labels, tuple(cfg.classes))


def resolve_images(run: Run, items: Sequence[str | int] | None
                   ) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, H, W, C) images and a title for each, from test-set indices and/or file paths."""
    cfg = run.config.data
    test_images, test_labels = test_set(run)
    if not items:
        firsts = [int(np.flatnonzero(test_labels == c)[0]) for c in np.unique(test_labels)]
        items = firsts[:DEFAULT_IMAGES]
    batches, titles = [], []
    for item in items:
        text = str(item).strip()
        if text.isdigit():
            index = int(text)
            if index >= len(test_labels):
                raise ValueError(f"image index {index} is past the {len(test_labels)} test images "
                                 f"of {cfg.dataset}.")
            batches.append(test_images[index:index + 1])
            titles.append(f"test #{index} (label {int(test_labels[index])})")
        else:
            pixels = read_image_file(pathlib.Path(text), run.spec.image_shape)
            batches.append(pixels)
            titles += [pathlib.Path(text).name + (f"[{i}]" if len(pixels) > 1 else "")
                       for i in range(len(pixels))]
    return np.concatenate(batches), titles


def _pick_layers(table: Sequence[Layer], layers: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(layers for feature-map grids, layers for act-max); by default the top-level maps, and the
    last feature layer and the classes."""
    maps = [l.name for l in table if l.is_map]
    if not layers:
        target = last_feature_layer(table)
        return [l.name for l in top_level(table)], [target, LOGITS] if target else [LOGITS]
    known = [l.name for l in table]
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise ValueError(f"--layer {', '.join(unknown)}: no such layer; layers are "
                         f"{', '.join(known)}.")
    return [n for n in layers if n in maps], list(layers)


def visualize_run(run_dir: pathlib.Path | str, images: Sequence[str | int] | None = None,
                  layers: Sequence[str] | None = None, cam_layer: str | None = None,
                  scale: str = "channel", seed: int | None = None,
                  actmax: ActMaxConfig = ActMaxConfig(), smoothgrad_samples: int = 32,
                  ig_steps: int = 128, recognizer: pathlib.Path | str | None = None) -> pathlib.Path:
    """Writes feature maps, act-max, attributions, filter health and report.html; returns its path.

    `images`: test-set indices or .npy/.png paths (default: the first test image of each of the
    first four classes). `layers`: layers for the per-layer grids and act-max (default: grids of
    the model's top-level maps, act-max of the last feature layer, SeedCNN's conv2, a ResNet's
    layer4, and of the class logits). `cam_layer`: Grad-CAM's layer (default: that last feature
    layer's rectified map, SeedCNN's 'pool2:in' = ReLU(conv2)). `recognizer`: another run (an
    independently trained model) that classifies the class images.
    """
    if scale not in feature_maps.SCALES:
        raise ValueError(f"scale must be one of {feature_maps.SCALES}, got {scale!r}.")
    run_dir = pathlib.Path(run_dir)
    run = load_run(run_dir)
    spec, model, variables = run.spec, run.model, run.variables
    table = list_layers(model, variables, spec.image_shape)
    grid_layers, actmax_layers = _pick_layers(table, layers)
    with_inputs = list_layers(model, variables, spec.image_shape, inputs=True)
    cam_layer = cam_layer or rectified_feature_layer(with_inputs)
    if cam_layer is not None and cam_layer not in [l.name for l in with_inputs if l.is_map]:
        raise ValueError(f"--cam-layer {cam_layer!r} is not a spatial layer; choose one of "
                         f"{', '.join(l.name for l in with_inputs if l.is_map)} ('<module>:in' "
                         f"is the map that module reads, e.g. after a ReLU).")
    other = _load_recognizer(recognizer, run) if recognizer is not None else None
    key = jax.random.key(run.config.train.seed if seed is None else seed)
    actmax_key, smooth_key, reinit_key = jax.random.split(key, 3)
    del key

    pixels, titles = resolve_images(run, images)
    out = run_dir / OUT_DIR
    out.mkdir(exist_ok=True)
    x = normalize(jnp.asarray(pixels), spec.mean, spec.std)
    display = pixels.astype(np.float32) / 255.0
    bounds = pixel_bounds(spec.mean, spec.std)  # per channel for a colour dataset
    record: dict = {}  # the checks' numbers, written to checks.json beside the report's tables
    sections = [("run", "Run", _run_section(run, table))]
    sections.append(("curves", "Training curves", _curves_section(run_dir)))
    sections.append(("calibration", "Calibration", _calibration_section(out, run, record)))
    sections.append(("feature-maps", "Feature maps",
                     _feature_map_section(out, model, variables, x, display, titles,
                                          [l.name for l in top_level(table)], grid_layers, scale)))
    sections.append(("actmax", "Activation maximization",
                     _actmax_section(out, run, actmax_layers, actmax_key, bounds, actmax, other,
                                     record)))
    sections.append(("attribution", "Saliency, SmoothGrad, Integrated Gradients, Grad-CAM",
                     _attribution_section(out, run, x, display, titles, cam_layer, smooth_key,
                                          reinit_key, bounds, smoothgrad_samples, ig_steps,
                                          record)))
    report.write_json(out / "checks.json", record)
    sections.append(("filter-health", "Filter health",
                     _health_section(out, run, model, variables)))
    intro = H.note(f"Run directory: {run_dir.resolve()}. Written by `cnnjax visualize --run "
                   f"{run_dir}`; PNGs and JSON are in {OUT_DIR}/.")
    path = run_dir / REPORT
    path.write_text(H.page(f"cnnjax run report: {run_dir.name}", sections, intro), encoding="utf-8")
    return path


def _run_section(run: Run, table: Sequence[Layer]) -> str:
    summary_path = run.run_dir / "summary.json"
    body = ""
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        rows = [(k, s[k]) for k in ("dataset", "seed", "num_params", "best_epoch", "epochs_run",
                                    "dead_filters") if k in s]
        rows += [(f"{split} {m}", s[split][m]) for split in ("val", "test") if split in s
                 for m in ("accuracy", "loss") if m in s[split]]
        body += H.table(["summary", "value"], rows)
    body += H.table(["layer", "kind", "output shape (per example)"],
                    [(l.name, l.kind, " x ".join(map(str, l.shape))) for l in table])
    return body


def _curves_section(run_dir: pathlib.Path) -> str:
    if not any((run_dir / n).exists() for n in CURVES) and (run_dir / "metrics.jsonl").exists():
        plot_run(run_dir)
    found = [run_dir / n for n in CURVES if (run_dir / n).exists()]
    if not found:
        return H.note("No training plots or metrics.jsonl in the run directory.")
    return "".join(H.figure(p, p.stem.replace("_", " "), width=480) for p in found)


def _calibration_section(out, run: Run, record) -> str:
    images, labels = test_set(run)
    table = calibration.reliability(softmax(run.logits(images)), labels)
    record["calibration"] = {"split": "test", **table.to_json()}
    path = save_figure(reliability_figure({run.run_dir.name: table}),
                       out / "reliability.png")
    return (H.note(f"Expected calibration error on the {len(labels)} test images: "
                   f"{table.ece:.4f} ({len(table.count)} equal-width confidence bins; the "
                   f"count-weighted mean of |accuracy - confidence|). A point below the diagonal "
                   f"is a bin where the model is more confident than it is right.")
            + H.figure(path, "reliability diagram: accuracy against confidence per bin, and "
                             "the share of test predictions in each bin"))


def _feature_map_section(out, model, variables, x, display, titles, map_names, grid_layers,
                         scale) -> str:
    wanted = list(dict.fromkeys([*map_names, *grid_layers]))
    # jit hands dicts back with sorted keys; the name lists keep the call order
    captured = jax.device_get(jax.jit(lambda v, x: capture(model, v, x, wanted))(variables, x))
    scale_text = "each channel its own min..max" if scale == "channel" else "one min..max per layer"
    body = H.note(f"Each layer's output as the module returns it (a conv's is before its ReLU). "
                  f"Colour scale: {scale_text}; channel k is tile k, row-major; a flat (dead) "
                  f"channel is dark.")
    for i, title in enumerate(titles):
        maps = feature_maps.spatial_maps(captured, i, wanted)
        overview = feature_maps.save_figure(
            feature_maps.overview_figure(display[i], {n: maps[n] for n in map_names}, scale,
                                         title=title),
            out / f"overview_{i}.png")
        grids = feature_maps.write_layer_grids(out, f"maps_{i}", {n: maps[n] for n in grid_layers},
                                               scale)
        figs = "".join(H.figure(p, f"{n}: {' x '.join(map(str, maps[n].shape))}", width=min(
            560, 4 * np.asarray(maps[n]).shape[1] * int(np.ceil(np.sqrt(maps[n].shape[-1])))),
            pixelated=True) for n, p in grids.items())
        body += H.details(f"Image {i}: {title}",
                          H.figure(overview, "from the input up the hierarchy (first 16 channels)")
                          + figs, open_=i == 0)
    return body


def _load_recognizer(path, run: Run) -> Run:
    other = load_run(pathlib.Path(path))
    if (other.spec.image_shape, other.spec.num_classes) != (run.spec.image_shape,
                                                            run.spec.num_classes):
        raise ValueError(f"--recognizer {path}: its model takes {other.spec.image_shape} images "
                         f"and {other.spec.num_classes} classes, this run's "
                         f"{run.spec.image_shape} and {run.spec.num_classes}; train it on the "
                         f"same dataset.")
    return other


def _recognize(other: Run, images: np.ndarray, bounds) -> np.ndarray:
    """The other run's softmax on model-space images of this run, renormalized as it expects."""
    pixels = in_units(images, bounds)
    x = (pixels - other.spec.mean) / other.spec.std
    logits = jax.jit(other.model.apply)(inference_variables(other.variables), jnp.asarray(x))
    return np.asarray(jax.nn.softmax(logits))


def _actmax_section(out, run: Run, layers, key, bounds, cfg, other, record) -> str:
    model, variables, image_shape = run.model, run.variables, run.spec.image_shape
    body = H.note(f"Gradient ascent from a seeded start, {cfg.steps} Adam steps on the image's "
                  f"Fourier spectrum (amplitudes scaled by 1/f^{cfg.decay_power:g}: a frequency "
                  f"prior), a sigmoid to the pixel range (no clipping; L2 {cfg.l2:g} on its "
                  f"input), and at every step a random jitter of up to {cfg.jitter:g}px, zoom of "
                  f"±{cfg.scale:g} and rotation of ±{cfg.rotate:g}°. Maximizes each channel's log "
                  f"mean {'rectified ' if cfg.rectify else ''}activation, a class's log-softmax. "
                  f"Tile k is channel (class) k, shown on the pixel range. Gain = final / start "
                  f"activation. A filter nothing drives above zero is listed as never made to fire.")
    pictures, rows, quality, detail = "", [], [], {}
    test_pixels = test_set(run)[0][:LOCALIZATION_IMAGES].astype(np.float64) / 255.0
    digits_sat = checks.saturation(test_pixels, (0.0, 1.0))
    digits_hf = checks.high_frequency_share(test_pixels)
    record["actmax"] = {"saturation_tolerance": checks.SATURATED, "layers": {},
                        "test_digits": {"images": len(test_pixels),
                                        "saturated_fraction_mean": float(digits_sat.mean()),
                                        "high_frequency_share_mean": float(digits_hf.mean())}}
    for i, layer in enumerate(layers):
        result = activation_maximization(model, variables, layer, image_shape,
                                         jax.random.fold_in(key, i), bounds=bounds, cfg=cfg)
        path = feature_maps.save_png(out / f"actmax_{layer.replace('/', '.')}.png",
                                     actmax_grid(result))
        gain = np.where(result.start > 0, result.final / np.where(result.start > 0, result.start, 1),
                        np.where(result.final > 0, np.inf, 0.0))
        silent = [] if layer == LOGITS else np.flatnonzero(result.final <= 0).tolist()
        sat = checks.saturation(result.images, bounds)
        hf = checks.high_frequency_share(result.images)
        detail[layer] = {"channels": result.channels.tolist(), "start": result.start.tolist(),
                         "final": result.final.tolist(), "never_fired": silent,
                         "saturated_fraction": sat, "high_frequency_share": hf}
        record["actmax"]["layers"][layer] = {
            "images": len(sat), "saturated_fraction_mean": float(sat.mean()),
            "saturated_fraction_max": float(sat.max()), "images_at_most_10pct": int((sat <= 0.1).sum()),
            "high_frequency_share_mean": float(hf.mean())}
        rows.append((layer, len(result.channels), float(np.median(result.final)),
                     float(np.median(gain)), ", ".join(map(str, silent)) or "none"))
        quality.append((layer, float(sat.mean()), float(sat.max()),
                        f"{int((sat <= 0.1).sum())} / {len(sat)}", float(hf.mean())))
        caption = f"{layer}: {len(result.channels)} {'classes' if layer == LOGITS else 'channels'}"
        pictures += H.figure(path, caption, width=min(
            560, 3 * image_shape[1] * int(np.ceil(np.sqrt(len(result.channels))))), pixelated=True)
        if layer == LOGITS and other is not None:
            pictures += _recognition(other, result, bounds, record)
    report.write_json(out / "actmax.json", detail)
    kind = "digits" if image_shape[-1] == 1 else "images"
    quality.append((f"reference: {len(test_pixels)} test {kind}", float(digits_sat.mean()),
                    float(digits_sat.max()), f"{int((digits_sat <= 0.1).sum())} / "
                    f"{len(digits_sat)}", float(digits_hf.mean())))
    body += pictures
    body += H.table(["layer", "channels", "median final activation", "median gain",
                     "never made to fire"], rows)
    body += H.note(f"How to read: saturated pixels are within {checks.SATURATED:g} of the pixel "
                   f"range's ends; an image mostly at the bounds shows where the ascent ran out "
                   f"of range, not a pattern (aim: at most 10% per image). The high-frequency "
                   f"share is the spectral energy above half the Nyquist frequency (0.25 "
                   f"cycles/pixel); pixel-scale stripes score near 1, real digits score as the "
                   f"reference row (a digit's own black background counts as saturated there).")
    body += H.table(["images", "saturated pixels, mean", "max", "images with <= 10% saturated",
                     "high-frequency share, mean"], quality)
    return body


def _recognition(other: Run, result, bounds, record) -> str:
    probs = _recognize(other, result.images, bounds)
    predicted = probs.argmax(-1)
    hits = predicted == result.channels
    record["actmax"]["recognized"] = {
        "recognizer": str(other.run_dir), "recognizer_seed": other.config.train.seed,
        "classes": result.channels.tolist(), "predicted": predicted.tolist(),
        "probability_of_class": probs[np.arange(len(probs)), result.channels].tolist(),
        "recognized": int(hits.sum())}
    return (H.note(f"How to read: each class image is shown to another model, {other.run_dir} "
                   f"(seed {other.config.train.seed}), trained apart from this one. A class "
                   f"image it calls that class carries the class's shape, not a quirk of this "
                   f"model's weights. Recognized: {int(hits.sum())} of {len(hits)} classes.")
            + H.table(["class", "other model's prediction", "its probability of the class"],
                      [(int(c), int(p), float(probs[k, c]))
                       for k, (c, p) in enumerate(zip(result.channels, predicted))]))


def _attribution_section(out, run: Run, x, display, titles, cam_layer, smooth_key, reinit_key,
                         bounds, samples, ig_steps, record) -> str:
    model, variables = run.model, run.variables

    @jax.jit
    def attributions(v, reinit, x, key):
        fn = attribution.logits_fn(model, v)
        targets = fn(x).argmax(-1)
        baseline = jnp.broadcast_to(jnp.asarray(bounds[0], x.dtype), x.shape)  # black: "no ink"
        result = {"targets": targets,
                  "gradient": attribution.gradient(fn, x, targets),
                  "smoothgrad": attribution.smoothgrad(fn, x, targets, key, samples),
                  "integrated": attribution.integrated_gradients(fn, x, targets, baseline, ig_steps),
                  "reinit": attribution.gradient(attribution.logits_fn(model, reinit), x, targets)}
        result["ig_sum"], result["ig_diff"] = attribution.completeness_gap(
            fn, x, targets, baseline, result["integrated"])
        if cam_layer is not None:
            for method in attribution.CAM_METHODS:
                result[method] = attribution.grad_cam(model, v, x, targets, cam_layer, method)
        return result

    reinit = attribution.reinitialized(model, variables, reinit_key, x[:1])
    r = jax.device_get(attributions(variables, reinit, x, smooth_key))
    maps = {"gradient": attribution.heatmap(r["gradient"]),
            "SmoothGrad": attribution.heatmap(r["smoothgrad"]),
            "Integrated Gradients": attribution.heatmap(r["integrated"])}
    if cam_layer is not None:
        maps[f"Grad-CAM ({cam_layer})"] = r["gradcam"]
        maps[f"Grad-CAM++ ({cam_layer})"] = r["gradcam++"]
    maps["gradient, re-initialized model"] = attribution.heatmap(r["reinit"])
    rank = [attribution.spearman(maps["gradient"][i], maps["gradient, re-initialized model"][i])
            for i in range(len(x))]
    rows_titles = [f"{t}\npredicted {int(p)}" for t, p in zip(titles, r["targets"])]
    path = feature_maps.save_figure(attribution.overlay_figure(display, maps, rows_titles),
                                    out / "attribution.png", dpi=90)
    gap = np.abs(r["ig_sum"] - r["ig_diff"]) / np.maximum(np.abs(r["ig_diff"]), 1e-12)
    report.write_json(out / "attribution.json", {
        "targets": r["targets"], "cam_layer": cam_layer, "ig_steps": ig_steps,
        "ig_sum": r["ig_sum"], "logit_minus_baseline": r["ig_diff"], "ig_relative_gap": gap,
        "saliency_rank_correlation_with_reinitialized": rank})
    body = H.note("Maps explain the predicted class; each is scaled to its own maximum. Integrated "
                  "Gradients start from a black image. Grad-CAM weighs the rectified feature map's "
                  "channels by their gradient; Grad-CAM++ by their positive gradients, position by "
                  "position. The last column is the model-randomization sanity check (Adebayo et "
                  "al., 2018): the gradient of a model with re-initialized weights should look "
                  "unlike the trained model's.")
    body += H.figure(path, "input, then each method's map over it")
    body += H.table(["image", "predicted", "IG sum", "logit(x) - logit(black)", "relative gap",
                     "rank corr. with re-initialized"],
                    [(t, int(p), float(s), float(d), float(g), float(c)) for t, p, s, d, g, c in
                     zip(titles, r["targets"], r["ig_sum"], r["ig_diff"], gap, rank)])
    if cam_layer is not None:
        body += _localization(run, cam_layer, record)
    return body


def _localization(run: Run, cam_layer: str, record) -> str:
    """Grad-CAM's pointing game and mass on the dilated stroke over the first test digits."""
    if run.spec.image_shape[-1] != 1:
        return H.note("Localization is measured on digits (bright strokes on black); this "
                      "dataset's images have no stroke mask.")
    pixels = test_set(run)[0][:LOCALIZATION_IMAGES]
    x = normalize(jnp.asarray(pixels), run.spec.mean, run.spec.std)

    @jax.jit
    def cams(v, x):
        targets = attribution.logits_fn(run.model, v)(x).argmax(-1)
        return {m: attribution.grad_cam(run.model, v, x, targets, cam_layer, m)
                for m in attribution.CAM_METHODS}

    masks = checks.stroke_mask(pixels.astype(np.float64) / 255.0)
    found = {m: checks.localization(c, masks)
             for m, c in jax.device_get(cams(run.variables, x)).items()}
    record["localization"] = {"layer": cam_layer, "images": len(pixels), "ink": checks.INK,
                              "dilation_px": 1, **{m: l.to_json() for m, l in found.items()}}
    uniform = next(iter(found.values()))
    rows = [(f"{m} ({cam_layer})", l.pointing, l.mass, l.coverage) for m, l in found.items()]
    rows.append(("uniform map (floor)", uniform.uniform_pointing, uniform.uniform_mass, 1.0))
    return (H.note(f"How to read: over the first {len(pixels)} test digits, the pointing game is "
                   f"the fraction whose map maximum falls on the digit's stroke (pixels above "
                   f"{checks.INK:g}, dilated by 1 px), and the mass the mean fraction of the map "
                   f"on that stroke; a map that follows the digit beats the uniform map's floor "
                   f"(the stroke's share of the image) on both. Coverage is the mean of the map, "
                   f"scaled to its maximum, over the stroke: a single hot pixel on the stroke wins "
                   f"the first two but covers almost nothing.")
            + H.table(["map", "pointing game", "mass on stroke", "coverage of stroke"], rows))


def _health_section(out, run: Run, model, variables) -> str:
    data = input_pipeline.load_data(run.config.data, run.config.train.seed)
    health = filter_health(model, variables, data.val[0], run.spec.mean, run.spec.std)
    if not health:
        return H.note("The model has no conv layers.")
    report.write_json(out / "filter_health.json",
                      {"split": "val", "total_dead": sum(len(h.dead) for h in health.values()),
                       "layers": {n: h.to_json() for n, h in health.items()}})
    path = feature_maps.save_figure(health_figure(health), out / "filter_health.png", dpi=90)
    body = H.note(f"Over the run's {data.val[0].shape[0]} validation images. A filter is dead when "
                  f"its pre-activation is <= 0 on every image and position: its ReLU passes nothing "
                  f"and no gradient, so it cannot recover.")
    body += H.figure(path, "per-filter mean activation and fraction of zeroed outputs; dead in red")
    body += H.table(["layer", "measured at", "filters", "dead", "dead filters",
                     "median zeroed fraction"],
                    [(h.layer, h.measured_at, len(h.mean_activation), len(h.dead),
                      ", ".join(map(str, h.dead)) or "none", float(np.median(h.dead_fraction)))
                     for h in health.values()])
    return body
