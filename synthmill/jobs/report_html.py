"""The pieces a report page is made of: escaped text, tables, plots as SVG, thumbnails as data: URIs, and the
reads of a synthmill output they need (its JSON files, its index, chosen images from its shards).

Everything lands in one HTML file: a plot is a matplotlib figure saved as SVG and embedded as an ``<img>``
whose ``src`` is a ``data:`` URI (each SVG keeps its own ids), and a thumbnail is a small JPEG the same way.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from synthmill.sharding import storage
from synthmill.sharding.layout import INDEX, INDEX_PARTS, SHARDS, OutputLayout

#: The longest side of a thumbnail, in pixels, and its JPEG quality.
THUMB_PX = 160
THUMB_QUALITY = 80
#: At most this many images of one output on its contact sheet, whatever its size, from at most this many of its
#: shards (so at most that many tars are opened).
CONTACT_SHEET = 64
SHEET_SHARDS = 8
#: The sample of thumbnails is drawn with this seed, so one output's page shows the same images every time.
SAMPLE_SEED = 0
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A cell's text: numbers to 6 significant digits, missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], css: str = "",
          cell_class: Any = None) -> str:
    """An HTML table; each cell holds its value as JSON in ``data-value`` (the exact number) and as text.

    ``cell_class(column, row)``: an optional CSS class per cell (a difference's colour)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cls = cell_class(c, row) if cell_class else ""
            cells.append(f"<td{f' class={chr(34)}{cls}{chr(34)}' if cls else ''} "
                         f"data-value=\"{esc(json.dumps(v))}\">{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=\"{esc(css)}\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(width: float = 6.4, height: float = 3.2):
    """A matplotlib Figure (no pyplot: no global state, no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def svg_img(fig, alt: str) -> str:
    """The figure as an ``<img>`` of its SVG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return f"<img class=\"plot\" alt=\"{esc(alt)}\" src=\"{data_uri('image/svg+xml', buf.getvalue())}\">"


def thumbnail(data: bytes) -> str:
    """A small JPEG of an encoded image, as a data: URI."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_PX, THUMB_PX))
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=THUMB_QUALITY)
    return data_uri("image/jpeg", out.getvalue())


def thumb_figure(data: bytes | None, caption: str, title: str = "") -> str:
    """One thumbnail with its caption (the image's absence said in words)."""
    img = (f"<img class=\"thumb\" alt=\"{esc(caption)}\" src=\"{thumbnail(data)}\">" if data is not None
           else "<div class=\"missing\">no image</div>")
    return (f"<figure title=\"{esc(title or caption)}\">{img}<figcaption>{esc(caption)}</figcaption></figure>")


def seeded_sample(items: Sequence[Any], n: int, seed: int = SAMPLE_SEED) -> list[Any]:
    """At most ``n`` of ``items``, drawn with a fixed seed, in their original order."""
    if len(items) <= n:
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


# ---- reading an output ----------------------------------------------------------------------------------

def read_json(layout: OutputLayout, name: str) -> Any:
    return layout.read_json(name)


def read_parquet(url: str, opts: Mapping[str, Any] | None, columns: list[str] | None = None):
    """A parquet file as a pyarrow Table, or None when there is none."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url, dict(opts) if opts else None)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    return table.select([c for c in columns if c in table.column_names]) if columns else table


def read_index(layout: OutputLayout, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """A generate (or filter) output's index rows: ``index.parquet``, or its committed shards' parts before it
    exists (a job still running)."""
    import pyarrow as pa

    whole = read_parquet(layout.file(INDEX), layout.opts, columns)
    if whole is not None:
        return whole.to_pylist()
    parts = [read_parquet(layout.file(INDEX_PARTS, name), layout.opts, columns)
             for name in sorted(storage.list_sizes(layout.file(INDEX_PARTS), layout.opts))
             if name.endswith(".parquet") and not storage.is_temporary(name)]
    parts = [p for p in parts if p is not None]
    return pa.concat_tables(parts, promote_options="permissive").to_pylist() if parts else []


def markers(layout: OutputLayout) -> list[tuple[float, dict[str, Any]]]:
    """(commit time, marker) of every committed shard, in commit order: a marker is written last, so its
    file's modification time is when its shard was committed."""
    fs, path = storage.filesystem(layout.file(SHARDS), layout.opts)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") != "file" or not name.endswith(".json") or storage.is_temporary(name):
            continue
        marker = storage.read_json(layout.file(SHARDS, name), layout.opts, damaged_as_missing=True)
        if isinstance(marker, dict) and "count" in marker:
            out.append((_mtime(e), marker))
    return sorted(out, key=lambda m: (m[0], m[1].get("shard", 0)))


def _mtime(entry: Mapping[str, Any]) -> float:
    t = entry.get("mtime") or entry.get("LastModified") or entry.get("created") or 0.0
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def read_images(layout: OutputLayout, wanted: Mapping[int, Iterable[str]]) -> dict[str, bytes]:
    """key -> encoded image bytes, for the keys of each shard in ``wanted`` (shard -> keys).

    Each tar is read once, as far as its last wanted image, by seeking from header to header: the images not
    wanted are skipped, never read (remote tars in small blocks, so a skip costs a header's read)."""
    out: dict[str, bytes] = {}
    for shard, keys in sorted(wanted.items()):
        need = set(keys)
        fs, path = storage.filesystem(layout.file(SHARDS, f"{shard:06d}.tar"), layout.opts)
        try:
            fh = fs.open(path, "rb") if layout.is_local else fs.open(path, "rb", block_size=1 << 16)
        except FileNotFoundError:
            continue
        with fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if key in need and ext.lower() in IMAGE_EXTS:
                    out[key] = tar.extractfile(member).read()
                    need.discard(key)
                    if not need:
                        break
    return out


def read_folder_images(url: str, opts: Mapping[str, Any] | None, keys: Iterable[str]) -> dict[str, bytes]:
    """key -> bytes of the image files named KEY.EXT in the folder at ``url`` (an evaluated image folder)."""
    names = storage.list_sizes(url, dict(opts) if opts else None)
    by_key = {}
    for name in names:
        stem, _, ext = name.rpartition(".")
        if ext.lower() in IMAGE_EXTS:
            by_key.setdefault(stem, name)
    return {k: storage.read_bytes(storage.join(url, by_key[k]), dict(opts) if opts else None)
            for k in keys if k in by_key}


PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}table.protocol td{text-align:left}
td.better{background:#d8f3d8}td.worse{background:#f8d7d7}
.sheet{display:flex;flex-wrap:wrap;gap:.5em}
figure{margin:0;width:136px;font-size:.7em}figure img.thumb{width:128px;height:auto;image-rendering:pixelated}
figcaption{overflow:hidden;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical}
.grid td{vertical-align:top;text-align:center}.grid td.prompt{text-align:left;max-width:18em;font-size:.8em}
.grid img.thumb{width:128px;image-rendering:pixelated}
img.plot{max-width:100%;height:auto;display:block;margin:.5em 0}
.missing{width:128px;height:128px;background:#eee;display:flex;align-items:center;justify-content:center}
.note{color:#666;font-size:.85em}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}
"""


def page(title: str, sections: Sequence[str]) -> str:
    """The whole HTML document."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{PAGE_CSS}</style></head>"
            f"<body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>\n")
