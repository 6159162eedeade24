"""The report's section for a study output (``OUTPUT/table.json``, ``OUTPUT/models/NAME/`` generate outputs and
``OUTPUT/scores/NAME/`` evaluate outputs): the table, measured beside published with the difference coloured;
a same-seed grid (a row per prompt, a column per model: sample i has seed + i in every model, so what differs
is the model); a bar chart per metric, and per category when the evaluations had categories."""

from __future__ import annotations

from typing import Any

from synthmill.errors import SpecError
from synthmill.jobs import report_html as h
from synthmill.sharding.layout import METRICS, OutputLayout

TABLE = "table.json"
#: Rows of the same-seed grid at most.
GRID_ROWS = 8
#: Metrics (table.json keys) where lower is better; every other one is better higher.
LOWER_IS_BETTER = frozenset({"fid", "kid", "kid_std", "cmmd", "cmmd_unbiased", "is_std", "clip_truncated_captions"})
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def section(layout: OutputLayout, plan: dict[str, Any], title: str) -> str:
    table = h.read_json(layout, TABLE)
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise SpecError(f"{layout.file(TABLE)}: a study output without its table (table.json); has the study "
                        "finished?")
    metrics, rows = list(table.get("metrics", [])), table["rows"]
    columns = table.get("columns") or (list(rows[0]) if rows else [])
    parts = [f"<h2>{h.esc(title)}</h2>",
             f"<p>prompts: <code>{h.esc(table.get('prompts', ''))}</code>, seed {h.esc(table.get('seed', ''))}</p>",
             "<h3>Table</h3>",
             h.table(columns, rows, css="study", cell_class=_difference_class)]
    parts.append(same_seed_grid(layout, [r["model"] for r in rows], table.get("seed")))
    parts.append("<h3>Metrics</h3>" + "".join(metric_bars(m, rows) for m in metrics if _has_values(rows, m)))
    parts.append(category_bars(layout, [r["model"] for r in rows]))
    return "<section class=\"study\">" + "".join(parts) + "</section>"


def _difference_class(column: str, row: dict[str, Any]) -> str:
    if not column.endswith("_difference") or not isinstance(row.get(column), (int, float)) or row[column] == 0:
        return ""
    lower = column[: -len("_difference")] in LOWER_IS_BETTER
    return "better" if (row[column] < 0) == lower else "worse"


def _has_values(rows: list[dict[str, Any]], metric: str) -> bool:
    return any(isinstance(r.get(metric), (int, float)) for r in rows)


def same_seed_grid(layout: OutputLayout, models: list[str], seed: Any) -> str:
    """Rows of prompts, a column per model; the same key (so the same seed) across a row."""
    if not models:
        return ""
    outputs = {m: OutputLayout(layout.file("models", m), layout.opts) for m in models}
    index = {m: {r["key"]: r for r in h.read_index(out, ["key", "shard", "prompt", "seed"])}
             for m, out in outputs.items()}
    common = sorted(set.intersection(*(set(i) for i in index.values())))
    keys = h.seeded_sample(common, GRID_ROWS)
    images = {m: h.read_images(out, _by_shard(index[m], keys)) for m, out in outputs.items()}
    head = "<th>prompt</th>" + "".join(f"<th>{h.esc(m)}</th>" for m in models)
    body = []
    for k in keys:
        first = index[models[0]][k]
        cells = "".join(f"<td>{h.thumb_figure(images[m].get(k), 'seed ' + str(index[m][k].get('seed')))}</td>"
                        for m in models)
        body.append(f"<tr><td class=\"prompt\">{h.esc(first.get('prompt') or '(blank prompt)')}"
                    f"<br><span class=\"note\">{h.esc(k)}</span></td>{cells}</tr>")
    note = (f"<p class=\"note\">{len(keys)} of {len(common)} samples, drawn with seed {h.SAMPLE_SEED}; sample i has "
            f"seed {h.esc(seed)} + i in every model.</p>")
    return (f"<h3>Same seed, every model</h3>{note}<table class=\"grid\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _by_shard(index: dict[str, dict[str, Any]], keys: list[str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for k in keys:
        out.setdefault(int(index[k]["shard"]), set()).add(k)
    return out


def metric_bars(metric: str, rows: list[dict[str, Any]]) -> str:
    """Measured per model as bars; the published value, where there is one, as a mark over its bar."""
    names = [r["model"] for r in rows]
    fig, ax = h.figure(6.4, 2.8)
    measured = [r.get(metric) if isinstance(r.get(metric), (int, float)) else 0.0 for r in rows]
    ax.bar(names, measured, color=COLOURS[0], label="measured")
    published = [(i, r.get(f"{metric}_published")) for i, r in enumerate(rows)]
    published = [(i, v) for i, v in published if isinstance(v, (int, float))]
    if published:
        ax.scatter([i for i, _ in published], [v for _, v in published], marker="_", s=900, linewidths=3,
                   color="#222", label="published", zorder=3)
        ax.legend()
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    return h.svg_img(fig, f"{metric} per model")


def category_bars(layout: OutputLayout, models: list[str]) -> str:
    """Per-sample metrics' category means, a chart per metric: categories along, a bar per model."""
    tables = {}
    for m in models:
        metrics = h.read_json(OutputLayout(layout.file("scores", m), layout.opts), METRICS) or {}
        by = (metrics.get("categories") or {}).get("by_category")
        if by:
            tables[m] = by
    if not tables:
        return ""
    categories = sorted({c for by in tables.values() for c in by}, key=lambda c: (0, int(c), "") if c.isdigit()
                        else (1, 0, c))  # ids in number order
    columns = sorted({k for by in tables.values() for v in by.values() for k in v if k != "count"})
    out = ["<h3>By category</h3>"]
    width = 0.8 / len(tables)
    for col in columns:
        fig, ax = h.figure(max(6.4, 0.5 * len(categories) * len(tables)), 3.0)
        for j, (m, by) in enumerate(tables.items()):
            values = [(by.get(c) or {}).get(col) for c in categories]
            ax.bar([i + (j - (len(tables) - 1) / 2) * width for i in range(len(categories))],
                   [v if isinstance(v, (int, float)) else 0.0 for v in values], width=width,
                   color=COLOURS[j % len(COLOURS)], label=m)
        ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 6 else 0, ha="right"
                      if len(categories) > 6 else "center")
        ax.set_ylabel(col)
        ax.legend()
        out.append(h.svg_img(fig, f"{col} by category"))
    return "".join(out)
