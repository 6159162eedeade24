"""The report's section for a distill output: from ``metrics.jsonl``, the curve of every loss term, the
learning rate and samples/s against the step."""

from __future__ import annotations

import json
from typing import Any

from synthmill.jobs import report_html as h
from synthmill.sharding import storage
from synthmill.sharding.layout import SUMMARY, TRAIN_LOG, OutputLayout

#: metrics.jsonl's keys plotted on their own (loss terms, the keys that start with "loss", share one plot).
OWN_PLOTS = {"lr": "learning rate", "samples_per_s": "samples/s"}


def section(layout: OutputLayout, plan: dict[str, Any], title: str) -> str:
    lines = read_log(layout)
    parts = [f"<h2>{h.esc(title)}</h2>"]
    summary = h.read_json(layout, SUMMARY)
    facts = [("status", (summary or {}).get("status", "running or stopped (no summary.json yet)")),
             ("steps logged", len(lines)), ("last step", lines[-1]["step"] if lines else None)]
    for key in ("teacher", "student"):
        if key in plan:
            facts.append((key, json.dumps(plan[key]) if not isinstance(plan[key], str) else plan[key]))
    parts.append(h.table(["", "value"], [{"": k, "value": v} for k, v in facts], css="counts"))
    if not lines:
        parts.append("<p class=\"note\">no logged step yet (metrics.jsonl).</p>")
        return "<section class=\"distill\">" + "".join(parts) + "</section>"
    steps = [r["step"] for r in lines]
    terms = [k for k in lines[0] if k.startswith("loss") and _numeric(lines, k)]
    fig, ax = h.figure()
    for term in terms:
        ax.plot(steps, [r.get(term) for r in lines], label=term, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    parts.append("<h3>Loss terms</h3>" + h.svg_img(fig, "loss terms: " + ", ".join(terms)))
    for key, label in OWN_PLOTS.items():
        if _numeric(lines, key):
            fig, ax = h.figure(6.4, 2.4)
            ax.plot(steps, [r.get(key) for r in lines], marker="." if len(steps) < 50 else None, color="#55a868")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            parts.append(f"<h3>{h.esc(label)}</h3>" + h.svg_img(fig, label))
    return "<section class=\"distill\">" + "".join(parts) + "</section>"


def _numeric(lines: list[dict[str, Any]], key: str) -> bool:
    values = [r.get(key) for r in lines]
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def read_log(layout: OutputLayout) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(layout.file(TRAIN_LOG), layout.opts).decode("utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill while it was appended
            continue
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out
