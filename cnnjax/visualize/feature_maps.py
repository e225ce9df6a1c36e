"""Direct display: every channel of a feature map as a tile of one PNG, and an overview per image.

Tiles are built as arrays and written with `imsave`, one pixel per activation (the HTML report
scales them up without smoothing): a 64-channel grid costs milliseconds, not a matplotlib figure
per channel. Channel k sits at row k // cols, column k % cols. Input images (the overview's first
panel, act-max results) are shown as they are: grey for one channel, RGB for three.
"""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

import matplotlib
import matplotlib.image
import numpy as np

from cnnjax.report.plots import new_figure

SCALES = ("channel", "shared")


def normalize_channels(fmap: np.ndarray, scale: str = "channel") -> np.ndarray:
    """(H, W, C) -> values in [0, 1]: min..max per channel ('channel') or over all ('shared').

    A constant channel (a dead filter) maps to 0, so it shows as the colour scale's bottom.
    """
    if scale not in SCALES:
        raise ValueError(f"colour scale must be one of {SCALES}, got {scale!r}.")
    fmap = np.asarray(fmap, np.float64)
    if fmap.ndim != 3:
        raise ValueError(f"a feature map is (H, W, C), got shape {fmap.shape}.")
    axes = (0, 1) if scale == "channel" else None
    lo = fmap.min(axis=axes, keepdims=True)
    span = fmap.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (fmap - lo) / np.where(span > 0, span, 1.0), 0.0)


def tile(images: np.ndarray, cols: int | None = None, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """(H, W, C) values -> (rows*(H+pad)-pad, cols*(W+pad)-pad) grid; `fill` between tiles."""
    h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), fill, np.float64)
    for k in range(c):
        r, q = divmod(k, cols)
        grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = images[..., k]
    return grid


def colorize(grid: np.ndarray, cmap: str = "viridis", gap: float = 1.0) -> np.ndarray:
    """[0, 1] values -> RGBA uint8; NaN (the gaps between tiles) becomes grey level `gap`."""
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(grid, nan=0.0))
    rgba[np.isnan(grid)] = (gap, gap, gap, 1.0)
    return (rgba * 255).round().astype(np.uint8)


def displayed(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W, C) display-range image -> (what `imshow` takes, its cmap): one channel as a grey
    (H, W) map, three as RGB (no cmap), any other count as its channel mean in grey."""
    image = np.asarray(image)
    if image.shape[-1] == 1:
        return image[..., 0], "gray"
    if image.shape[-1] == 3:
        return image, None
    return image.mean(axis=-1), "gray"


def rgb_grid(images: np.ndarray, cols: int | None = None, pad: int = 1,
             gap: float = 0.5) -> np.ndarray:
    """(K, H, W, 3) RGB values in [0, 1] -> RGBA uint8 grid, image k where `tile` puts channel k;
    grey level `gap` between tiles and in unused ones."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"an RGB grid takes (K, H, W, 3) images, got shape {images.shape}.")
    planes = np.stack([tile(np.moveaxis(images[..., c], 0, -1), cols, pad) for c in range(3)], -1)
    rgb = np.where(np.isnan(planes), gap, np.clip(planes, 0.0, 1.0))
    rgba = np.concatenate([rgb, np.ones((*rgb.shape[:2], 1))], axis=-1)
    return (rgba * 255).round().astype(np.uint8)


def channel_grid(fmap: np.ndarray, scale: str = "channel", cmap: str = "viridis") -> np.ndarray:
    """(H, W, C) feature map -> RGBA grid image of all C channels."""
    return colorize(tile(normalize_channels(fmap, scale)), cmap)


def save_png(path: pathlib.Path, rgba: np.ndarray) -> pathlib.Path:
    matplotlib.image.imsave(path, rgba)
    return path


def overview_figure(image: np.ndarray, maps: Mapping[str, np.ndarray], scale: str = "channel",
                    title: str = "", max_channels: int = 16):
    """One page from the input up the hierarchy: a row per layer, its first `max_channels` channels.

    `image` is (H, W, C) in display range [0, 1], shown as `displayed` says (RGB for three
    channels); maps are (H, W, C) per layer, in call order.
    """
    rows = 1 + len(maps)
    fig, axes = new_figure(rows, max_channels, figsize=(max_channels * 0.75, rows * 0.95),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    pixels, cmap = displayed(image)
    axes[0, 0].imshow(pixels, cmap=cmap, vmin=0, vmax=1)
    axes[0, 0].set_title("input", fontsize=7, loc="left")
    for r, (name, fmap) in enumerate(maps.items(), start=1):
        shown = normalize_channels(fmap, scale)
        for k in range(min(max_channels, shown.shape[-1])):
            axes[r, k].imshow(shown[..., k], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        h, w, c = fmap.shape
        more = f" (first {max_channels})" if c > max_channels else ""
        axes[r, 0].set_title(f"{name}  {h}x{w}x{c}{more}", fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig


def save_figure(fig, path: pathlib.Path, dpi: int = 100) -> pathlib.Path:
    fig.savefig(path, dpi=dpi)
    return path


def write_layer_grids(out_dir: pathlib.Path, prefix: str, maps: Mapping[str, np.ndarray],
                      scale: str = "channel") -> dict[str, pathlib.Path]:
    """A PNG grid per spatial layer, named `<prefix>_<layer>.png` ('/' in paths becomes '.')."""
    written = {}
    for name, fmap in maps.items():
        path = out_dir / f"{prefix}_{name.replace('/', '.')}.png"
        written[name] = save_png(path, channel_grid(np.asarray(fmap), scale))
    return written


def spatial_maps(captured: Mapping[str, np.ndarray], index: int,
                 names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Example `index`'s (H, W, C) maps from batched captures, keeping spatial layers only."""
    names = names if names is not None else list(captured)
    return {n: np.asarray(captured[n][index]) for n in names if np.ndim(captured[n]) == 4}
