"""Running a generate job: validate -> plan -> skip done shards -> actors -> index -> summary.

The driver holds no state that a rerun cannot rebuild from OUTPUT (docs/design.md, invariant 4): what is
done is read from the shard markers every time, so running the same command again resumes. The run goes
through the lifecycle every kind shares (:mod:`synthmill.jobs.lifecycle`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from synthmill.cluster.connect import starts_local_ray
from synthmill.errors import SpecError
from synthmill.jobs import lifecycle
from synthmill.jobs.fields import MAX_SEED, require
from synthmill.jobs.generate_spec import GenerateSpec
from synthmill.jobs.outputs import VALIDATE_RETRY_S, check_output_folder, check_plan_matches_job, versions
from synthmill.jobs.spec import field_value, node_paths
from synthmill.models.loading import check_model_path, check_parts, model_files, parts_files
from synthmill.sharding import storage
from synthmill.sharding.layout import FAILURES, PLAN, SUMMARY, OutputLayout
from synthmill.sharding.plan import MAX_SHARDS, ShardPlan, earlier_parts, plan_problem, shard_fingerprint
from synthmill.sharding.sources import PromptSource, open_source, rows_digest

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated job, ready to run: the spec, its scanned prompt source and the shard plan."""

    spec: GenerateSpec
    source: PromptSource
    plan: ShardPlan
    model_files: dict[str, list] | None = None  # see synthmill.models.loading.model_files
    parts_files: dict[str, dict[str, list]] = field(default_factory=dict)  # model.unet's, model.lora's (likewise)
    #: the parts earlier runs ended with, when the prompts grew since (plan.json's ``grown_from``)
    earlier: list[dict[str, Any]] = field(default_factory=list)
    prompts_before: int = 0  # rows the output's plan had before this run (0: a new output)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint(self.source.digest)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """What the markers of each part's shards hold."""
        return (*(p["fingerprint"] for p in self.earlier), self.fingerprint)

    def shard_fingerprint(self) -> Callable[[int], str]:
        return lambda k: self.fingerprints[self.plan.part_of(k)]

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.spec.output.path, self.spec.storage)


def done_shards(layout: OutputLayout, shard_ids: Any, fingerprint: str | Callable[[int], str],
                check: str = "size") -> dict[int, dict[str, Any]]:
    """Markers of the committed shards of this job among ``shard_ids`` (synthmill.sharding.units); ``fingerprint``:
    what each marker holds, or ``k ->`` that, for a job whose prompts grew."""
    of = fingerprint if callable(fingerprint) else (lambda k: fingerprint)
    return layout.shards.done(shard_ids, lambda k: {"fingerprint": of(k)}, check)


def _previous_plan(out: str, opts: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan.json already in ``out``, or None (none, or not a mapping; the output check names what is wrong)."""
    try:
        previous = storage.read_json(storage.join(out, PLAN), opts)
    except (OSError, ValueError, storage.StorageError, SpecError):  # output.path is a file, or under one
        return None
    return previous if isinstance(previous, dict) else None


def _marks(previous: dict[str, Any] | None) -> tuple[int, ...]:
    """The row counts whose digests the scan takes: where each earlier run's prompts ended."""
    if previous is None:
        return ()
    ends = [p.get("prompts") for p in earlier_parts(previous) if isinstance(p, dict)] + [previous.get("prompts")]
    return tuple(n for n in ends if isinstance(n, int) and not isinstance(n, bool) and n > 0)


def _changed_rows(spec: GenerateSpec, source: PromptSource, previous: dict[str, Any], first: int, stop: int) -> str:
    """Which rows in ``[first, stop)`` changed since ``previous`` (the output's plan) was made: the rows of the first
    committed shard whose rows' digest (in its marker) differs from what the file now holds, else the range."""
    out, s = spec.output.path, spec.sampling
    ends = _marks(previous)
    plan = ShardPlan(ends[-1], s.images_per_prompt, spec.output.samples_per_shard, s.seed, ends[:-1])
    layout = OutputLayout(out, spec.storage)
    done = done_shards(layout, range(plan.num_shards), shard_fingerprint(previous))
    for k in sorted(done):
        rows = plan.prompts(k)
        if rows.stop <= first or rows.start >= stop or "rows_digest" not in done[k]:
            continue
        now = source.read_rows(rows.start, min(rows.stop, source.num_rows))
        if len(now) != len(rows) or rows_digest(now) != done[k]["rows_digest"]:
            return f"rows {rows.start + 1}..{rows.stop} (those of shard {k:06d}, the first one whose rows changed)"
    return f"rows {first + 1}..{stop} (the bytes of some row changed)"


def _grown(spec: GenerateSpec, source: PromptSource, previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of ``previous`` (the output's plan, made by these settings from other rows) when the prompt file
    only grew since: every row it was made from is there, unchanged. Else a SpecError naming the first rows that
    changed, or were removed."""
    out, url = spec.output.path, spec.prompts.path
    keys = ("prompts", "shards", "prompts_digest", "fingerprint")
    parts = [*earlier_parts(previous), {k: previous.get(k) for k in keys}]
    start = 0
    for part in parts:
        n = part.get("prompts")
        if not isinstance(n, int) or n <= 0:
            raise SpecError(f"output.path {out}: its {PLAN} names no prompt count; use a new output.path")
        if n > source.num_rows:
            raise SpecError(
                f"prompts.path {url}: it has {source.num_rows} rows, and {out} was generated from {n}: rows "
                f"{source.num_rows + 1}..{n} were removed (or prompts.limit lowered); restore them, or use a new "
                "output.path")
        if part.get("prompts_digest") not in source.prefix_digests.get(n, (source.digest,) if n == source.num_rows
                                                                         else ()):
            rows = _changed_rows(spec, source, previous, start, n)
            raise SpecError(
                f"prompts.path {url}: {rows} differ from those {out} was generated from; rows may only be "
                "appended to a prompt file an output was made from: restore them, or use a new output.path")
        start = n
    return parts


def check_output(spec: GenerateSpec, source: PromptSource, files: dict[str, list] | None = None,
                 parts: dict[str, dict[str, list]] | None = None) -> list[dict[str, Any]]:
    """``output.path`` must be new, empty, or an earlier run of this same job (with the same prompts, or rows appended
    to them, and the model's files as they were: ``files``, see :func:`~synthmill.models.loading.model_files`).
    Returns the parts the earlier runs ended with (plan.json's ``grown_from``), when the prompts grew since."""
    out, opts = spec.output.path, spec.storage
    previous = _previous_plan(out, opts)
    fingerprint = spec.fingerprint(source.digest)
    try:
        check_output_folder(out, fingerprint, opts, "generate")
        earlier = earlier_parts(previous) if previous and previous.get("fingerprint") == fingerprint else []
    except SpecError:
        before = previous.get("prompts_digest") if previous else None
        # the prompts are all that differs when the spec with the earlier rows gives the earlier fingerprint
        # (another job's folder differs in its settings too): grown, or edited
        if not (before and before != source.digest and spec.fingerprint(before) == previous.get("fingerprint")):
            raise
        check_plan_matches_job(out, opts, previous)
        earlier = _grown(spec, source, previous)
    previous = storage.read_plan(out, opts)
    previous = previous if isinstance(previous, dict) else {}
    recorded = previous.get("parts_files") if isinstance(previous.get("parts_files"), dict) else {}
    for name, before, now in [("model.path", previous.get("model_files"), files),
                              *((name, recorded.get(name), now) for name, now in (parts or {}).items())]:
        if isinstance(before, dict) and now is not None and before != now:  # outputs of older code lack them
            changed = sorted(set(before) ^ set(now) | {k for k in before.keys() & now.keys() if before[k] != now[k]})
            raise SpecError(
                f"{name} {field_value(spec, name)}: its files changed since {out} was started from it "
                f"({changed[0] or 'the file itself'}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}: "
                "other size, time or presence; a training run exporting again into the same folder does this); "
                "the shards done were made by the files it replaced, so resuming would mix two models: use a new "
                "output.path, or restore the model")
    return earlier



def prepare(spec: GenerateSpec) -> Prepared:
    """Check every input without loading a model or writing anything, then scan the prompts."""
    field = "model.path"
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            only_here = starts_local_ray(spec.cluster.address)
            check_model_path(spec.model, spec.storage, only_here=only_here)
            files = model_files(spec.model.path, spec.storage)
            check_parts(spec.model, spec.storage, only_here=only_here)  # each error names its part's field
            parts = parts_files(spec.model, spec.storage)
            field = "prompts.path"
            source = open_source(spec.prompts.path, spec.prompts.column, spec.prompts.limit, spec.storage,
                                 tuple(spec.prompts.keep), dict(spec.prompts.per_row))
            source.check()
            s = spec.sampling
            plan = ShardPlan(0, s.images_per_prompt, spec.output.samples_per_shard, s.seed)
            previous = _previous_plan(spec.output.path, spec.storage)
            # every row parsed, the content digest taken, and that of the rows each earlier run ended with
            source.scan(plan.rows_per_shard(), _marks(previous))
            field = "output.path"
            earlier = check_output(spec, source, files, parts)
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    plan = ShardPlan(source.num_rows, s.images_per_prompt, spec.output.samples_per_shard, s.seed,
                     tuple(p["prompts"] for p in earlier))
    require(s.seed + plan.num_samples - 1 <= MAX_SEED, "sampling.seed",
            f"{s.seed} + {plan.num_samples} samples passes the largest seed, 2**63-1")
    require(source.max_row_seed + s.images_per_prompt - 1 <= MAX_SEED, "prompts.per_row.seed",
            f"a row's seed {source.max_row_seed} + its {s.images_per_prompt} images passes the largest seed, 2**63-1")
    require(plan.num_shards <= MAX_SHARDS, "output.samples_per_shard",
            f"{plan.num_samples:,} samples at {plan.samples_per_shard:,} a shard are {plan.num_shards:,} shards, more "
            f"than a job holds ({MAX_SHARDS:,}: a file each, and a marker); raise it")
    before = previous.get("prompts") if previous and previous.get("kind") in (None, "generate") else 0
    return Prepared(spec, source, plan, files, parts, earlier, before if isinstance(before, int) else 0)


def plan_summary(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: sizes of the plan and what is already done."""
    done = done_shards(p.layout, range(p.plan.num_shards), p.shard_fingerprint(), p.spec.output.resume_check)
    return {
        "prompts": p.plan.num_prompts,
        "prompts_new": p.plan.num_prompts - p.prompts_before,  # rows the output's plan does not hold yet
        "samples": p.plan.num_samples,
        "shards": p.plan.num_shards,
        "samples_per_shard": p.plan.samples_per_shard,
        "shards_done": len(done),
        "samples_done": sum(m["count"] for m in done.values()),
        "output": storage.redact_url(p.spec.output.path),
        "fingerprint": p.fingerprint,
    }


def _same_compute(p: Prepared, before: dict[str, Any] | None, use_gpu: bool) -> dict[str, Any]:
    """What this run's actors compute on, which must be what made the shards already done (``before``, from
    plan.json; None when none are done, or for outputs of earlier code): a GPU's float16 and a CPU's float32
    give other images, and so does another number of torch threads on a CPU (``cluster.cpus_per_actor``
    sets it), so a resume that changes either would mix two numerics in one dataset."""
    c = p.spec.cluster
    compute = {"device": "cuda" if use_gpu else "cpu", "cpu_threads": None if use_gpu else c.cpus_per_actor}
    if isinstance(before, dict) and before != compute:
        out = p.spec.output.path
        if before.get("device") != compute["device"]:
            raise SpecError(f"cluster: the shards done in {out} were made on {before.get('device')} actors, and this "
                            f"cluster's actors would run on {compute['device']}, which gives other images; resume "
                            "it on the same kind of device, or use a new output.path")
        n = before.get("cpu_threads")
        raise SpecError(f"cluster.cpus_per_actor: the shards done in {out} were made by CPU actors with {n} torch "
                        f"thread{'' if n == 1 else 's'}, and this run's would have {c.cpus_per_actor}; on a "
                        f"CPU the thread count changes the float32 images, so set cluster.cpus_per_actor="
                        f"{n} to resume, or use a new output.path")
    return compute


def actor_utilisation(infos: list[dict[str, Any]], markers: dict[int, dict[str, Any]],
                      committed_at: dict[int, float]) -> list[dict[str, Any]]:
    """Per actor of this run: shards, samples, seconds holding the device, and its device idle fraction.

    An actor's active window runs from when the driver saw it ready to when it saw its last shard
    committed; the device is busy while the pipeline runs a batch. The idle rest is waiting for work,
    reading prompts, and any encoding or upload that did not overlap the next batch.
    """
    rows = []
    for info in infos:
        mine = [k for k in committed_at if (markers[k]["host"], markers[k]["pid"]) == (info["host"], info["pid"])]
        if not mine:
            continue
        active = max(committed_at[k] for k in mine) - info["ready_at"]
        busy = sum(markers[k]["denoise_s"] for k in mine)
        rows.append({
            "host": info["host"], "pid": info["pid"], "device": info["device"], "shards": len(mine),
            "samples": sum(markers[k]["count"] for k in mine), "denoise_s": round(busy, 3),
            "active_s": round(active, 3),
            "device_idle_fraction": round(max(0.0, 1.0 - busy / active), 4) if active > 0 else 0.0,
            "images_per_s": round(sum(markers[k]["count"] for k in mine) / active, 4) if active > 0 else 0.0,
        })
    return rows


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    new = plan.get("prompts_new", plan["prompts"])
    grown = f" ({new} new since the output's last run)" if 0 < new < plan["prompts"] else ""
    return (f"ok: {spec_path}: {plan['prompts']} prompts{grown} -> {plan['samples']} samples in {plan['shards']} "
            "shards")


def done_line(summary: dict[str, Any], output: str) -> str:
    if summary.get("complete_already"):
        return (f"done already: {summary['samples']} samples in {summary['shards']} shards at {output}, complete "
                f"since {summary['finished_at']}; nothing to run")
    return (
        f"done: {summary['samples']} samples in {summary['shards']} shards at {output} "
        f"({summary['shards_resumed']} shards resumed, {summary['samples_run']} samples generated in "
        f"{summary['elapsed_s']:.1f}s, {summary['images_per_s']:.2f} images/s; retries {summary['retries']}, "
        f"truncated prompts {summary['truncated_prompts']}, blank prompts {summary['blank_prompts']})"
    )


class GenerateJob(lifecycle.Job):
    unit_noun = "shards"

    def __init__(self, p: Prepared, starting: threading.Event | None = None):
        self.p, self.spec, self.layout, self.plan_ = p, p.spec, p.layout, p.plan
        self.starting = starting  # set while an actor starts (ShardPool's ``starting``)
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.startup: dict[str, Any] = {}  # seconds from run() to each start-up milestone
        self.markers = done_shards(self.layout, range(p.plan.num_shards), p.shard_fingerprint(),
                                   p.spec.output.resume_check)
        self.resumed = len(self.markers)
        self.todo = [k for k in range(p.plan.num_shards) if k not in self.markers]
        log.info("%d shards planned, %d already done, %d to run", p.plan.num_shards, self.resumed, len(self.todo))
        previous = storage.read_plan(self.layout.url, self.layout.opts)
        self.compute = previous.get("compute") if isinstance(previous, dict) else None
        self.report = None
        self.committed_at: dict[int, float] = {}  # driver wall clock when each shard of this run was committed

    def kept(self) -> dict[str, Any] | None:
        if self.todo:
            return None
        finished = self.layout.read_json(SUMMARY)
        if (isinstance(finished, dict) and finished.get("status") == "complete"
                and finished.get("fingerprint") == self.p.fingerprint):
            log.info("complete already (finished %s): nothing to run", finished.get("finished_at"))
            return {**finished, "complete_already": True}  # nothing is rewritten: its summary stays
        return None

    def pending(self) -> bool:
        return bool(self.todo)

    def placed(self, resources: dict[str, float]) -> None:
        from synthmill.cluster.connect import actor_count, check_actor_fits

        self.startup["ray_connected_s"] = round(time.perf_counter() - self.t0, 3)
        check_actor_fits(self.spec.cluster, resources)
        self.n_actors, self.use_gpu = actor_count(self.spec.cluster.num_actors, resources,
                                                  self.spec.cluster.cpus_per_actor)
        self.compute = _same_compute(self.p, self.compute if self.resumed else None, self.use_gpu)

    def plan(self) -> dict[str, Any]:
        p = self.p
        plan = {"kind": "generate", "fingerprint": p.fingerprint, "prompts": p.plan.num_prompts,
                "prompts_digest": p.source.digest, "model_files": p.model_files,
                "samples": p.plan.num_samples, "shards": p.plan.num_shards,
                "samples_per_shard": p.plan.samples_per_shard, "compute": self.compute}
        if p.parts_files:  # only when given: plans of jobs without trained parts stay as they were
            plan["parts_files"] = p.parts_files
        if p.earlier:  # the prompts grew: each earlier run's rows, their digest, and the shards they made
            plan["grown_from"] = p.earlier
        return plan

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        import ray

        from synthmill.cluster.connect import actor_options
        from synthmill.cluster.generator import GeneratorActor
        from synthmill.cluster.pool import ProgressBar, ShardPool

        spec, plan, todo = self.spec, self.plan_, self.todo
        n_actors = min(self.n_actors, len(todo))
        source_ref, plan_ref = ray.put(self.p.source), ray.put(plan)
        options = actor_options(spec.cluster, self.use_gpu)
        seen = node_paths(spec, ("model.path", "model.unet.path", "model.lora.*.path", "prompts.path",
                                 "output.path"))  # what each actor reads

        def make_actor():
            return GeneratorActor.options(**options).remote(spec, source_ref, plan_ref, seen, self.p.fingerprints)

        pool = ShardPool(make_actor, n_actors, inflight=spec.cluster.inflight_per_actor,
                         max_attempts=spec.cluster.max_attempts, start_timeout_s=spec.cluster.start_timeout_s,
                         logs=self.layout, starting=self.starting)
        bar = ProgressBar(sum(len(plan.samples(k)) for k in todo), "generate")
        try:
            def committed(k: int, marker: dict[str, Any]) -> None:
                self.markers[k] = marker
                self.committed_at[k] = time.time()
                self.startup.setdefault("first_shard_committed_s", round(time.perf_counter() - self.t0, 3))
                bar.committed(marker["count"])

            self.report = pool.run(todo, committed, bar.update)
        finally:
            bar.close()
        return {f"{k:06d}": err for k, err in sorted(self.report.failed.items())}

    def failures_record(self, failures: dict[str, str]) -> dict[str, Any]:
        return {"failed_shards": failures, "shards_done": len(self.markers), "shards": self.plan_.num_shards}

    def failure_message(self, failures: dict[str, str]) -> str:
        names = ", ".join(list(failures)[:10]) + (" ..." if len(failures) > 10 else "")
        first = next(iter(failures.values()))
        return (f"{len(failures)} of {self.plan_.num_shards} shards failed ({names}); first error: {first}. "
                f"Run the same command again to retry them; done shards are kept.")

    def finish(self) -> dict[str, Any]:
        from synthmill.sharding.index import merge_index

        plan, markers, report, startup = self.plan_, self.markers, self.report, self.startup
        n_index = merge_index(self.layout, range(plan.num_shards), self.p.source.keep_types)
        if n_index != plan.num_samples:
            raise RuntimeError(f"index has {n_index} rows for {plan.num_samples} samples")
        elapsed = time.perf_counter() - self.t0
        if report and report.actor_infos:
            first = min(report.actor_infos, key=lambda i: i["ready_at"])
            startup["first_actor_ready_s"] = round(first["ready_at"] - self.wall0, 3)
            startup["first_actor_imports_s"] = first["import_s"]  # torch, diffusers, transformers in the actor
            startup["first_actor_model_load_s"] = first["load_s"]
        generated = sum(len(plan.samples(k)) for k in self.todo)
        return {
            "status": "complete",
            "kind": "generate",
            "fingerprint": self.p.fingerprint,
            "prompts": plan.num_prompts,
            "samples": plan.num_samples,
            "shards": plan.num_shards,
            "shards_resumed": self.resumed,
            "shards_run": len(self.todo),
            "samples_run": generated,
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(generated / elapsed, 4) if generated else 0.0,
            "blank_prompts": sum(m["blank_prompts"] for m in markers.values()),
            "truncated_prompts": sum(m["truncated_prompts"] for m in markers.values()),
            "nsfw_flagged": sum(m["nsfw"] for m in markers.values()),
            "actors_started": report.actors_started if report else 0,
            "actors_lost": report.actors_lost if report else 0,
            "retries": sum(max(0, a - 1) for a in report.attempts.values()) if report else 0,
            "devices": sorted({f"{i['device']} ({i['dtype']})" for i in report.actor_infos}) if report else [],
            "actors": actor_utilisation(report.actor_infos, markers, self.committed_at) if report else [],
            # start-up, in seconds since the job started running (after validation): Ray connected, first
            # actor ready (its imports and model load included, also given alone), first shard committed
            "startup": startup,
            "run_started_unix": round(self.wall0, 3),
            "started_at": self.started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(("synthmill", "torch", "diffusers", "transformers", "ray", "webdataset")),
        }


def run(p: Prepared, starting: threading.Event | None = None) -> dict[str, Any]:
    """Run the job to the end; return the summary. Raises JobFailed naming failed shards. ``starting``: set while
    an actor of the job starts (a study's scorers give it their place)."""
    return lifecycle.run(GenerateJob(p, starting))


# ---- synthmill status ----

#: plan.json keys that status reads, and their types
PLAN_KEYS = {"shards": int, "samples": int, "fingerprint": str}


def check_plan(plan: dict[str, Any]) -> str | None:
    """What is wrong with a plan.json of this kind beyond its keys' types, or None."""
    return plan_problem(plan)


def status(layout: OutputLayout, plan: dict[str, Any]) -> dict[str, Any]:
    """The state of a generate output, from its plan, markers, failures and summary."""
    from synthmill.sharding.writer import TMP_SUFFIX

    markers = done_shards(layout, range(plan["shards"]), shard_fingerprint(plan))
    failures = layout.read_json(FAILURES)
    failures = failures if isinstance(failures, dict) else {}
    summary = layout.read_json(SUMMARY)
    summary = summary if isinstance(summary, dict) else None
    samples_done = sum(m["count"] for m in markers.values())
    denoise_s = sum(m.get("denoise_s", 0.0) for m in markers.values())
    elapsed_s = sum(m.get("elapsed_s", 0.0) for m in markers.values())
    stray = [n for n in storage.list_sizes(layout.shards.folder, layout.opts) if n.endswith(TMP_SUFFIX)]
    return {
        "output": layout.url,
        "kind": "generate",
        "complete": bool(summary and summary.get("status") == "complete") and len(markers) == plan["shards"],
        "shards_done": len(markers),
        "shards": plan["shards"],
        "samples_done": samples_done,
        "samples": plan["samples"],
        "prompts": plan.get("prompts"),
        # the rows each run added: the first run's, then those appended before each later one
        "prompts_added": _added(plan),
        "failed_shards": (failures.get("failed_shards") or {}) if not summary else {},
        "images_per_s_per_actor": round(samples_done / elapsed_s, 4) if elapsed_s else None,
        "denoise_fraction": round(denoise_s / elapsed_s, 4) if elapsed_s else None,
        "job_images_per_s": summary.get("images_per_s") if summary else None,
        "device_idle": [a["device_idle_fraction"] for a in (summary or {}).get("actors", [])],
        "unfinished_temporaries": len(stray),
    }


def _added(plan: dict[str, Any]) -> list[int] | None:
    """The rows each run added to a grown job's prompts: the first run's, then those appended before each later
    one (None: the prompts never grew)."""
    ends = [p.get("prompts") for p in earlier_parts(plan)]
    if not ends or not all(isinstance(n, int) for n in [*ends, plan.get("prompts")]):
        return None
    ends.append(plan["prompts"])
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def render_status(st: dict[str, Any]) -> str:
    pct = 100.0 * st["samples_done"] / st["samples"] if st["samples"] else 100.0
    lines = [
        f"output     {st['output']}",
        f"state      {'complete' if st['complete'] else 'incomplete'}",
        f"shards     {st['shards_done']} / {st['shards']} done",
        f"samples    {st['samples_done']} / {st['samples']} ({pct:.1f}%)",
    ]
    if st.get("prompts_added"):
        first, *later = st["prompts_added"]
        lines.append(f"prompts    {st['prompts']}: {first} in the first run, then "
                     + ", ".join(f"{n} appended" for n in later) + f" ({later[-1]} new in the last run)")
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
