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

from cnnjax.data import datasets, input_pipeline
from cnnjax.report import logs as report
from cnnjax.training.runs import Run, load_run
from cnnjax.visualize import attribution, feature_maps, html_report as H
from cnnjax.visualize.actmax import ActMaxConfig, activation_maximization, actmax_grid
from cnnjax.nn.capture import Layer, capture, last_feature_layer, list_layers, top_level
from cnnjax.nn.health import filter_health
from cnnjax.report.plots import plot_run
from cnnjax.visualize.filter_health import health_figure

DEFAULT_IMAGES = 4  # the first test image of each of the first classes
CURVES = ("loss.png", "accuracy.png", "learning_rate.png", "grad_norm.png", "confusion_matrix.png")
OUT_DIR = "visualize"
REPORT = "report.html"


def read_image_file(path: pathlib.Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy (uint8, one image or a batch) or .png file as uint8 (N, H, W, C) for the model."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} not found; --images takes test-set indices or "
                                f".npy/.png paths.")
    if path.suffix.lower() == ".npy":
        pixels = np.load(path)
    elif path.suffix.lower() == ".png":
        import matplotlib.image

        pixels = matplotlib.image.imread(path)[..., :3]  # floats in [0, 1]; alpha dropped
        if pixels.ndim == 3 and image_shape[-1] == 1:
            pixels = pixels.mean(axis=-1)
        pixels = np.round(pixels * 255).astype(np.uint8)
    else:
        raise ValueError(f"image file {path}: expected .npy or .png.")
    if pixels.ndim in (2, 3) and pixels.shape[:2] == tuple(image_shape[:2]):
        pixels = pixels[None]
    return input_pipeline.as_nhwc(pixels, tuple(image_shape))


def resolve_images(run: Run, items: Sequence[str | int] | None
                   ) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, H, W, C) images and a title for each, from test-set indices and/or file paths."""
    cfg = run.config.data
    test_images, test_labels = datasets.load(cfg.dataset, "test", data_dir=cfg.data_dir,
                                             manual_dir=cfg.manual_dir)
    test_images = input_pipeline.as_nhwc(test_images, run.spec.image_shape)
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
    """(layers for feature-map grids, layers for act-max); by default the top-level maps and the
    last feature layer."""
    maps = [l.name for l in table if l.is_map]
    if not layers:
        target = last_feature_layer(table)
        return [l.name for l in top_level(table)], [target] if target else []
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
                  ig_steps: int = 128) -> pathlib.Path:
    """Writes feature maps, act-max, attributions, filter health and report.html; returns its path.

    `images`: test-set indices or .npy/.png paths (default: the first test image of each of the
    first four classes). `layers`: layers for the per-layer grids and act-max (default: grids of
    the model's top-level maps, act-max of the last feature layer: SeedCNN's conv2, a ResNet's
    layer4). `cam_layer`: Grad-CAM's layer (default: that same last feature layer).
    """
    if scale not in feature_maps.SCALES:
        raise ValueError(f"scale must be one of {feature_maps.SCALES}, got {scale!r}.")
    run_dir = pathlib.Path(run_dir)
    run = load_run(run_dir)
    spec, model, variables = run.spec, run.model, run.variables
    table = list_layers(model, variables, spec.image_shape)
    grid_layers, actmax_layers = _pick_layers(table, layers)
    cam_layer = cam_layer or last_feature_layer(table)
    if cam_layer is not None and cam_layer not in [l.name for l in table if l.is_map]:
        raise ValueError(f"--cam-layer {cam_layer!r} is not a spatial layer; choose one of "
                         f"{', '.join(l.name for l in table if l.is_map)}.")
    key = jax.random.key(run.config.train.seed if seed is None else seed)
    actmax_key, smooth_key, reinit_key = jax.random.split(key, 3)
    del key

    pixels, titles = resolve_images(run, images)
    out = run_dir / OUT_DIR
    out.mkdir(exist_ok=True)
    x = input_pipeline.normalize(jnp.asarray(pixels), spec.mean, spec.std)
    display = pixels.astype(np.float32) / 255.0
    bounds = ((0.0 - spec.mean) / spec.std, (1.0 - spec.mean) / spec.std)
    sections = [("run", "Run", _run_section(run, table))]
    sections.append(("curves", "Training curves", _curves_section(run_dir)))
    sections.append(("feature-maps", "Feature maps",
                     _feature_map_section(out, model, variables, x, display, titles,
                                          [l.name for l in top_level(table)], grid_layers, scale)))
    sections.append(("actmax", "Activation maximization",
                     _actmax_section(out, model, variables, spec.image_shape, actmax_layers,
                                     actmax_key, bounds, actmax)))
    sections.append(("attribution", "Saliency, SmoothGrad, Integrated Gradients, Grad-CAM",
                     _attribution_section(out, model, variables, x, display, titles, cam_layer,
                                          smooth_key, reinit_key, bounds, smoothgrad_samples,
                                          ig_steps)))
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


def _actmax_section(out, model, variables, image_shape, layers, key, bounds, cfg) -> str:
    body = H.note(f"Gradient ascent on the input from a seeded start, {cfg.steps} Adam steps, L2 "
                  f"{cfg.l2}, total variation {cfg.tv}, jitter {cfg.jitter}px; maximizes each "
                  f"channel's mean {'rectified ' if cfg.rectify else ''}activation (class logits "
                  f"for 'logits'). Tile k is channel k, shown on the pixel range. Gain = final / "
                  f"start activation. A first-layer filter is linear in the pixels, so its mean "
                  f"is maximized by a near-uniform image; deeper filters show the patterns they "
                  f"detect. A filter nothing drives above zero is listed as never made to fire.")
    record, rows = {}, []
    for i, layer in enumerate(layers):
        result = activation_maximization(model, variables, layer, image_shape,
                                         jax.random.fold_in(key, i), bounds=bounds, cfg=cfg)
        path = feature_maps.save_png(out / f"actmax_{layer.replace('/', '.')}.png",
                                     actmax_grid(result))
        gain = np.where(result.start > 0, result.final / np.where(result.start > 0, result.start, 1),
                        np.where(result.final > 0, np.inf, 0.0))
        silent = np.flatnonzero(result.final <= 0).tolist()
        record[layer] = {"channels": result.channels.tolist(), "start": result.start.tolist(),
                         "final": result.final.tolist(), "never_fired": silent}
        rows.append((layer, len(result.channels), float(np.median(result.final)),
                     float(np.median(gain)), ", ".join(map(str, silent)) or "none"))
        body += H.figure(path, f"{layer}: {len(result.channels)} channels", width=min(
            560, 3 * image_shape[1] * int(np.ceil(np.sqrt(len(result.channels))))), pixelated=True)
    report.write_json(out / "actmax.json", record)
    return body + H.table(["layer", "channels", "median final activation", "median gain",
                           "never made to fire"], rows)


def _attribution_section(out, model, variables, x, display, titles, cam_layer, smooth_key,
                         reinit_key, bounds, samples, ig_steps) -> str:
    @jax.jit
    def attributions(v, reinit, x, key):
        fn = attribution.logits_fn(model, v)
        targets = fn(x).argmax(-1)
        baseline = jnp.full_like(x, bounds[0])  # black pixels: "no ink"
        result = {"targets": targets,
                  "gradient": attribution.gradient(fn, x, targets),
                  "smoothgrad": attribution.smoothgrad(fn, x, targets, key, samples),
                  "integrated": attribution.integrated_gradients(fn, x, targets, baseline, ig_steps),
                  "reinit": attribution.gradient(attribution.logits_fn(model, reinit), x, targets)}
        result["ig_sum"], result["ig_diff"] = attribution.completeness_gap(
            fn, x, targets, baseline, result["integrated"])
        if cam_layer is not None:
            result["cam"] = attribution.grad_cam(model, v, x, targets, cam_layer)
        return result

    reinit = attribution.reinitialized(model, variables, reinit_key, x[:1])
    r = jax.device_get(attributions(variables, reinit, x, smooth_key))
    maps = {"gradient": attribution.heatmap(r["gradient"]),
            "SmoothGrad": attribution.heatmap(r["smoothgrad"]),
            "Integrated Gradients": attribution.heatmap(r["integrated"])}
    if "cam" in r:
        maps[f"Grad-CAM ({cam_layer})"] = r["cam"]
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
                  "Gradients start from a black image. The last column is the model-randomization "
                  "sanity check (Adebayo et al., 2018): the gradient of a model with re-initialized "
                  "weights should look unlike the trained model's.")
    body += H.figure(path, "input, then each method's map over it")
    body += H.table(["image", "predicted", "IG sum", "logit(x) - logit(black)", "relative gap",
                     "rank corr. with re-initialized"],
                    [(t, int(p), float(s), float(d), float(g), float(c)) for t, p, s, d, g, c in
                     zip(titles, r["targets"], r["ig_sum"], r["ig_diff"], gap, rank)])
    return body


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
