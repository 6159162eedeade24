"""The report's section for a generate output (and a filter output, which is a dataset of the same shape):
counts, a contact sheet of a seeded sample of its images with their prompts, images/s over time from the
shard markers, and each actor's device idle fraction from ``summary.json``."""

from __future__ import annotations

from typing import Any

from synthmill.jobs import report_html as h
from synthmill.sharding.layout import SUMMARY, OutputLayout

#: Each actor's colour in the images/s plot (the first ones by name; more actors are left out of it).
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


def section(layout: OutputLayout, plan: dict[str, Any], title: str) -> str:
    marks = h.markers(layout)
    summary = h.read_json(layout, SUMMARY)
    parts = [f"<h2>{h.esc(title)}</h2>", counts(plan, marks, summary), contact_sheet(layout)]
    parts.append("<h3>Images/s over time</h3>" + rate_plot(marks))
    parts.append("<h3>Device idle per actor</h3>" + idle_plot(summary))
    return "<section class=\"generate\">" + "".join(parts) + "</section>"


def counts(plan: dict[str, Any], marks: list[tuple[float, dict[str, Any]]], summary: dict[str, Any] | None) -> str:
    """Samples and shards done of the plan's, and what the markers count: blank, truncated and flagged prompts."""
    done = sum(m["count"] for _, m in marks)
    rows = [
        ("status", (summary or {}).get("status", "running or stopped (no summary.json yet)")),
        ("samples", f"{done} of {plan.get('samples', '?')}"),
        ("shards", f"{len(marks)} of {plan.get('shards', '?')}"),
        ("blank prompts", _total(marks, "blank_prompts")),
        ("truncated prompts", _total(marks, "truncated_prompts")),
        ("flagged (nsfw)", _total(marks, "nsfw")),
    ]
    if summary and "images_per_s" in summary:
        rows.append(("images/s (last run)", summary["images_per_s"]))
    devices = sorted({str(m.get("device")) for _, m in marks if m.get("device")})
    if devices:
        rows.append(("devices", ", ".join(devices)))
    return h.table(["", "value"], [{"": k, "value": v} for k, v in rows], css="counts")


def _total(marks: list[tuple[float, dict[str, Any]]], key: str) -> int | None:
    """The markers' sum of a count, or None where they do not record it (a filter's shards)."""
    have = [m[key] for _, m in marks if isinstance(m.get(key), int)]
    return sum(have) if have else None


def contact_sheet(layout: OutputLayout, limit: int = h.CONTACT_SHEET) -> str:
    index = h.read_index(layout, ["key", "shard", "prompt", "seed"])
    shards = set(h.seeded_sample(sorted({r["shard"] for r in index}), h.SHEET_SHARDS))
    chosen = h.seeded_sample([r for r in index if r["shard"] in shards], limit)
    wanted: dict[int, set[str]] = {}
    for row in chosen:
        wanted.setdefault(int(row["shard"]), set()).add(row["key"])
    images = h.read_images(layout, wanted)
    note = (f"<p class=\"note\">{len(chosen)} of {len(index)} samples, from {len(shards)} shards, drawn with seed "
            f"{h.SAMPLE_SEED}.</p>"
            if len(chosen) < len(index) else f"<p class=\"note\">all {len(index)} samples.</p>")
    figs = [h.thumb_figure(images.get(r["key"]), r.get("prompt") or "(blank prompt)",
                           f"{r['key']} seed {r.get('seed')}: {r.get('prompt')}") for r in chosen]
    return "<h3>Contact sheet</h3>" + note + "<div class=\"sheet\">" + "".join(figs) + "</div>"


def rate_plot(marks: list[tuple[float, dict[str, Any]]]) -> str:
    """Images/s over time from the shard markers: the whole job's (images committed so far over the time since the
    first shard started) at each commit, and each shard's own (its count over its elapsed time), by actor."""
    if not marks:
        return "<p class=\"note\">no shard committed yet.</p>"
    start = min(t - float(m.get("elapsed_s", 0.0)) for t, m in marks)
    times, rates, done = [], [], 0
    for t, m in marks:
        done += m["count"]
        times.append(t - start)
        rates.append(done / max(t - start, 1e-3))
    fig, ax = h.figure()
    ax.plot(times, rates, drawstyle="steps-post", color="#222", label="job: committed so far / time")
    actors: dict[str, list[tuple[float, float]]] = {}
    for (_, m), x in zip(marks, times, strict=True):
        if m.get("elapsed_s"):
            actors.setdefault(f"{m.get('host')}:{m.get('pid')}", []).append((x, m["count"] / m["elapsed_s"]))
    for j, (name, points) in enumerate(sorted(actors.items())[:len(COLOURS)]):
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color=COLOURS[j], label=f"shard on {name}")
    ax.set_xlabel("seconds since the first committed shard started")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    ax.set_title(f"{done} images in {times[-1]:.1f} s ({rates[-1]:.2f} images/s)")
    return h.svg_img(fig, "images per second over time")


def idle_plot(summary: dict[str, Any] | None) -> str:
    actors = (summary or {}).get("actors") or []
    if not actors:
        return "<p class=\"note\">no per-actor figures (summary.json is written when the job ends).</p>"
    names = [f"{a['host']}:{a['pid']}" for a in actors]
    fig, ax = h.figure(6.4, 0.6 + 0.35 * len(actors))
    ax.barh(names, [100 * a["device_idle_fraction"] for a in actors], color="#dd8452")
    ax.set_xlabel("device idle, % of the actor's active time")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    rows = [{"actor": n, "device": a.get("device"), "shards": a.get("shards"), "samples": a.get("samples"),
             "device idle": a["device_idle_fraction"], "images/s": a.get("images_per_s")}
            for n, a in zip(names, actors, strict=True)]
    return h.svg_img(fig, "device idle per actor") + h.table(list(rows[0]), rows, css="actors")
