"""The report's section for an evaluate output: every number of ``metrics.json`` with the protocol that made
it, the per-category table when there are categories, and the best and worst samples by each per-sample
score of ``scores.parquet``, with thumbnails read from the scored images where they lie."""

from __future__ import annotations

import math
from typing import Any

import yaml

from synthmill.jobs import report_html as h
from synthmill.sharding import storage
from synthmill.sharding.layout import JOB_YAML, METRICS, SCORES, OutputLayout

#: How many of the best and of the worst samples each per-sample score shows.
EXTREMES = 4
#: scores.parquet's columns that are not a score.
NOT_SCORES = ("key", "shard", "prompt_index", "nsfw")


def section(layout: OutputLayout, plan: dict[str, Any], title: str) -> str:
    metrics = h.read_json(layout, METRICS)
    parts = [f"<h2>{h.esc(title)}</h2>"]
    generated = generated_path(layout)
    if generated:
        parts.append(f"<p>scored: <code>{h.esc(storage.redact_url(generated))}</code></p>")
    if metrics is None:
        parts.append("<p class=\"note\">no metrics.json yet: the evaluation has not finished.</p>")
        return "<section class=\"evaluate\">" + "".join(parts) + "</section>"
    flat = flat_metrics(metrics.get("metrics", {}))
    parts.append("<h3>Metrics</h3>" + h.table(["metric", "value"], [{"metric": k, "value": v} for k, v in flat.items()],
                                               css="metrics"))
    samples = metrics.get("samples") or {}
    if samples:
        parts.append(h.table(["set", "samples"], [{"set": k, "samples": v} for k, v in samples.items()]))
    protocol = {k: v for k, v in flat_protocol(metrics.get("protocol") or {}).items() if v is not None}
    parts.append("<h3>Protocol</h3>" + h.table(["", "how"], [{"": k, "how": v} for k, v in protocol.items()],
                                               css="protocol"))
    cats = (metrics.get("categories") or {}).get("by_category")
    if cats:
        columns = ["category", *next(iter(cats.values())).keys()]
        parts.append(f"<h3>By category ({h.esc(metrics['categories'].get('column'))})</h3>"
                     + h.table(columns, [{"category": c, **v} for c, v in cats.items()], css="categories"))
    parts.append(extremes(layout, generated))
    return "<section class=\"evaluate\">" + "".join(parts) + "</section>"


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's numbers as one level: ``{"inception_score": {"mean": m}}`` is ``inception_score_mean``."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}_{sub}": x for sub, x in flat_metrics(v).items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def flat_protocol(protocol: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """metrics.json's protocol as one level: ``{"clip": {"model": m}}`` is ``clip.model``."""
    out: dict[str, Any] = {}
    for k, v in protocol.items():
        if isinstance(v, dict):
            out.update(flat_protocol(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def generated_path(layout: OutputLayout) -> str | None:
    """The scored set (the spec's ``generated.path``), from the output's ``job.yaml``."""
    try:
        spec = yaml.safe_load(storage.read_bytes(layout.file(JOB_YAML), layout.opts))
    except (FileNotFoundError, yaml.YAMLError):
        return None
    path = ((spec or {}).get("generated") or {}).get("path")
    return path if isinstance(path, str) else None


def score_columns(table) -> list[str]:
    import pyarrow as pa

    return [f.name for f in table.schema if f.name not in NOT_SCORES and pa.types.is_floating(f.type)]


def extremes(layout: OutputLayout, generated: str | None) -> str:
    """For each per-sample score: the EXTREMES best and worst samples, with their images."""
    table = h.read_parquet(layout.file(SCORES), layout.opts)
    if table is None:
        return "<p class=\"note\">no per-sample scores (scores.parquet).</p>"
    rows = table.to_pylist()
    picks = {}
    for col in score_columns(table):
        scored = sorted((r for r in rows if r[col] is not None and not math.isnan(r[col])), key=lambda r: r[col])
        picks[col] = (scored[::-1][:EXTREMES], scored[:EXTREMES])
    chosen = {r["key"]: r for best, worst in picks.values() for r in (*best, *worst)}
    images, prompts = source_images(generated, layout.opts, list(chosen.values()))
    out = ["<h3>Best and worst samples</h3>"]
    for col, (best, worst) in picks.items():
        for label, group in (("highest", best), ("lowest", worst)):
            figs = [h.thumb_figure(images.get(r["key"]), f"{col} {h.fmt(r[col])}",
                                   f"{r['key']}: {prompts.get(r['key']) or ''}") for r in group]
            out.append(f"<h4>{h.esc(col)}: {label}</h4><div class=\"sheet\">{''.join(figs)}</div>")
    return "".join(out)


def source_images(generated: str | None, opts: Any, rows: list[dict[str, Any]]) -> tuple[dict, dict]:
    """(key -> image bytes, key -> prompt) of ``rows`` of scores.parquet, read from the scored set: a synthmill
    output's shards (by the rows' shard), or an image folder's files. Other sets (foreign tars) give none."""
    if not generated or not rows:
        return {}, {}
    plan = storage.read_plan(generated, opts)
    if plan is not None and plan.get("kind") in ("generate", "filter"):
        layout = OutputLayout(generated, opts)
        wanted: dict[int, set[str]] = {}
        for r in rows:
            if r.get("shard") is not None:
                wanted.setdefault(int(r["shard"]), set()).add(r["key"])
        keys = {r["key"] for r in rows}
        prompts = {r["key"]: r.get("prompt") for r in h.read_index(layout, ["key", "prompt"]) if r["key"] in keys}
        return h.read_images(layout, wanted), prompts
    if not generated.endswith(".tar") and not any(c in generated for c in "*?["):
        return h.read_folder_images(generated, opts, [r["key"] for r in rows]), {}
    return {}, {}
