"""A self-contained HTML page: images inlined as base64 data URIs, so it opens from disk, mailed or
copied, with no server and no sibling files.

The page counts its images once loaded and writes the counts onto <body> (`data-images-loaded`,
`data-images-total`), so a headless browser's DOM dump tells whether every image decoded.
"""

from __future__ import annotations

import base64
import html
import pathlib
from typing import Iterable, Sequence

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1.5em 3em;
       color: #222; }
h1 { font-size: 1.5em; margin-top: 1em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
nav a { margin-right: 1em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figure img.pixels { image-rendering: pixelated; }
figcaption { font-size: 0.85em; color: #555; max-width: 560px; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f5f5f5; } td:first-child, th:first-child { text-align: left; }
td { white-space: nowrap; }
p.note { color: #555; max-width: 900px; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
"""

_COUNT_IMAGES = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
});
"""


def data_uri(path: pathlib.Path) -> str:
    """A PNG file as a data: URI."""
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"only PNG images are inlined, got {path}.")
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure(path: pathlib.Path, caption: str = "", width: int | None = None,
           pixelated: bool = False) -> str:
    """<figure> with the image inlined; `width` in CSS pixels scales it (pixelated: no smoothing)."""
    style = f' style="width:{width}px"' if width else ""
    cls = ' class="pixels"' if pixelated else ""
    alt = html.escape(caption or pathlib.Path(path).name, quote=True)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(path)}" alt="{alt}"{cls}{style}>{cap}</figure>'


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def details(summary: str, body: str, open_: bool = False) -> str:
    opened = " open" if open_ else ""
    return f"<details{opened}><summary>{html.escape(summary)}</summary>{body}</details>"


def section(anchor: str, title: str, body: str) -> str:
    anchor = html.escape(anchor, quote=True)
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """The whole document from (anchor, title, body html) sections, with a table of contents."""
    nav = "".join(f'<a href="#{html.escape(a, quote=True)}">{html.escape(t)}</a>'
                  for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{_COUNT_IMAGES}</script></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro}<nav>{nav}</nav>{body}</body></html>\n")
