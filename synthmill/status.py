"""``synthmill status OUTPUT``: progress of a generate, evaluate or distill output, read from OUTPUT alone.

``synthmill status JOB.yaml [key=value ...]`` reads the spec's ``output.path`` with its ``storage`` options
(an S3 endpoint or credentials that only the spec holds)."""

from __future__ import annotations

from typing import Any

from synthmill.errors import SpecError
from synthmill.sharding import storage
from synthmill.sharding.commit import done_shards
from synthmill.sharding.writer import TMP_SUFFIX

#: Seconds a storage outage may last while status reads before it gives up (as validation does).
RETRY_S = 10.0


def _read(url: str, opts: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object of the output's (a marker, summary, metrics, failures); a damaged one counts as absent."""
    obj = storage.read_json(url, opts, damaged_as_missing=True)
    return obj if isinstance(obj, dict) else None


#: plan.json keys that status reads, by job kind, and their types
PLAN_KEYS = {"generate": {"shards": int, "samples": int, "fingerprint": str},
             "evaluate": {"sets": dict, "fingerprint": str}, "distill": {}}


def _require_keys(output: str, plan: dict[str, Any]) -> None:
    """SpecError naming plan.json when it lacks what status reads (a damaged or foreign file)."""
    job = plan.get("kind", "generate")
    if not isinstance(job, str) or job not in PLAN_KEYS:
        raise SpecError(f"{storage.join(output, 'plan.json')}: damaged, unknown job kind {job!r}")
    for key, kind in PLAN_KEYS[job].items():
        if not isinstance(plan.get(key), kind) or isinstance(plan.get(key), bool):
            raise SpecError(f"{storage.join(output, 'plan.json')}: damaged, its '{key}' is missing or not "
                            f"{'a number' if kind is int else 'an object' if kind is dict else 'text'}")
    sets = plan.get("sets", {}) if job == "evaluate" else {}
    if not all(isinstance(v, dict) and isinstance(v.get("units"), int) for v in sets.values()):
        raise SpecError(f"{storage.join(output, 'plan.json')}: damaged, a set in its 'sets' has no count of units")


def _collect_evaluate(output: str, plan: dict[str, Any], opts: dict[str, Any] | None) -> dict[str, Any]:
    """The state of an evaluate output: units with a committed partial of this job, per set; the metrics."""
    sets = {}
    for name, info in plan["sets"].items():
        folder = storage.join(output, "partials", name)
        names = storage.list_sizes(folder, opts)
        done = [n for n in names if n.endswith(".json") and n[:-5] + ".npz" in names
                and (_read(storage.join(folder, n), opts) or {}).get("fingerprint") == plan["fingerprint"]]
        sets[name] = {"units_done": len(done), "units": info["units"], "samples": info.get("samples")}
    result = _read(storage.join(output, "metrics.json"), opts)
    failures = _read(storage.join(output, "failures.json"), opts) or {}
    return {
        "output": output, "kind": "evaluate",
        "complete": bool(result and result.get("status") == "complete"),
        "sets": sets,
        "metrics": result.get("metrics") if result else None,
        "failed_units": (failures.get("failed_units") or {}) if not result else {},
    }


def _render_evaluate(st: dict[str, Any]) -> str:
    lines = [f"output     {st['output']}", f"state      {'complete' if st['complete'] else 'incomplete'}"]
    for name, s in st["sets"].items():
        lines.append(f"{name:<10} {s['units_done']} / {s['units']} units scored"
                     + (f" ({s['samples']} samples)" if s["samples"] is not None else ""))
    for key, value in (st["metrics"] or {}).items():
        if isinstance(value, (int, float)):
            lines.append(f"{key:<10} {value:.6g}" if len(key) <= 10 else f"{key} {value:.6g}")
        elif key == "inception_score":
            lines.append(f"IS         {value['mean']:.6g} +- {value['std']:.3g} ({value['splits']} splits)")
    failed = st["failed_units"]
    lines.append(f"failures   {len(failed)}" + (":" if failed else ""))
    for name, err in list(failed.items())[:10]:
        lines.append(f"  unit {name}: {err}")
    return "\n".join(lines)


def _collect_distill(output: str, plan: dict[str, Any], opts: dict[str, Any] | None) -> dict[str, Any]:
    """The state of a distill output: the step of the latest checkpoint, the last metrics line, the summary."""
    import json

    from synthmill.jobs.distill import latest_step

    summary = _read(storage.join(output, "summary.json"), opts)
    try:
        text = storage.read_bytes(storage.join(output, "metrics.jsonl"), opts).decode(errors="replace")
    except FileNotFoundError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        last = json.loads(lines[-1]) if lines else None
    except ValueError:  # a line cut off by a crash mid-write (the job rewrites the file from its checkpoint)
        last = None
    return {
        "output": output, "kind": "distill",
        "complete": bool(summary and summary.get("status") == "complete"),
        "student": plan.get("student"), "teacher": plan.get("teacher"),
        "checkpoint_step": latest_step(output, opts), "max_steps": plan.get("max_steps"),
        "last_logged": last if isinstance(last, dict) else None,
        "pipeline": summary.get("pipeline") if summary else None,
    }


def _render_distill(st: dict[str, Any]) -> str:
    lines = [f"output     {st['output']}", f"state      {'complete' if st['complete'] else 'incomplete'}",
             f"model      {st['teacher']} -> {st['student']}",
             f"checkpoint step {st['checkpoint_step']} of {st['max_steps']}"]
    last = st["last_logged"]
    if last:
        lines.append(f"logged     step {last['step']}: loss {last['loss']:.5g} (task {last['loss_task']:.4g}, output KD "
                     f"{last['loss_output_kd']:.4g}, feature KD {last['loss_feature_kd']:.4g}), "
                     f"{last.get('samples_per_s')} samples/s")
    if st["pipeline"]:
        lines.append(f"pipeline   {st['pipeline']}")
    return "\n".join(lines)


def collect(output: str, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state of an output folder, from its plan, markers, failures and summary (or metrics); ``opts`` are
    fsspec storage options (a spec's ``storage``)."""
    plan = storage.read_plan(output, opts)
    if plan is None:
        raise SpecError(f"{output}: not a synthmill output (no plan.json)")
    _require_keys(output, plan)
    if plan.get("kind") == "evaluate":
        return _collect_evaluate(output, plan, opts)
    if plan.get("kind") == "distill":
        return _collect_distill(output, plan, opts)
    markers = done_shards(output, range(plan["shards"]), plan["fingerprint"], storage_options=opts)
    failures = _read(storage.join(output, "failures.json"), opts) or {}
    summary = _read(storage.join(output, "summary.json"), opts)
    samples_done = sum(m["count"] for m in markers.values())
    denoise_s = sum(m.get("denoise_s", 0.0) for m in markers.values())
    elapsed_s = sum(m.get("elapsed_s", 0.0) for m in markers.values())
    stray = [n for n in storage.list_sizes(storage.join(output, "shards"), opts) if n.endswith(TMP_SUFFIX)]
    return {
        "output": output,
        "kind": "generate",
        "complete": bool(summary and summary.get("status") == "complete") and len(markers) == plan["shards"],
        "shards_done": len(markers),
        "shards": plan["shards"],
        "samples_done": samples_done,
        "samples": plan["samples"],
        "failed_shards": (failures.get("failed_shards") or {}) if not summary else {},
        "images_per_s_per_actor": round(samples_done / elapsed_s, 4) if elapsed_s else None,
        "denoise_fraction": round(denoise_s / elapsed_s, 4) if elapsed_s else None,
        "job_images_per_s": summary.get("images_per_s") if summary else None,
        "device_idle": [a["device_idle_fraction"] for a in (summary or {}).get("actors", [])],
        "unfinished_temporaries": len(stray),
    }


def render(st: dict[str, Any]) -> str:
    """One screen of text."""
    if st.get("kind") == "evaluate":
        return _render_evaluate(st)
    if st.get("kind") == "distill":
        return _render_distill(st)
    pct = 100.0 * st["samples_done"] / st["samples"] if st["samples"] else 100.0
    lines = [
        f"output     {st['output']}",
        f"state      {'complete' if st['complete'] else 'incomplete'}",
        f"shards     {st['shards_done']} / {st['shards']} done",
        f"samples    {st['samples_done']} / {st['samples']} ({pct:.1f}%)",
    ]
    if st["images_per_s_per_actor"] is not None:
        lines.append(f"throughput {st['images_per_s_per_actor']} images/s per actor (shard time), "
                     f"denoising {100 * st['denoise_fraction']:.0f}% of it")
    if st["job_images_per_s"] is not None:
        lines.append(f"last run   {st['job_images_per_s']} images/s (whole job, wall clock)")
    if st.get("device_idle"):
        idle = st["device_idle"]
        lines.append(f"idle       devices idle {100 * sum(idle) / len(idle):.1f}% of their active time on average "
                     f"(last run, {len(idle)} actors; max {100 * max(idle):.1f}%)")
    failed = st["failed_shards"]
    lines.append(f"failures   {len(failed)}" + (":" if failed else ""))
    for name, err in list(failed.items())[:10]:
        lines.append(f"  shard {name}: {err}")
    if st["unfinished_temporaries"]:
        lines.append(f"temporary  {st['unfinished_temporaries']} unfinished shard files (never counted as done)")
    return "\n".join(lines)
