"""Running a filter job: select samples of an output by a SQL condition, copy them into new shards.

The driver reads the source's ``index.parquet`` (and the scores' ``scores.parquet``), and DuckDB evaluates the
spec's ``where`` over them, joined on ``key``: a condition that does not parse, names a column neither has, or
is not true/false is bad input (exit 2), found by DuckDB's own parser and binder on empty tables of the same
columns before any data is read, and nothing is written. The chosen samples, in source order, become the output's
samples ``0, 1, ...``; output shard ``k`` holds ``[k*S, (k+1)*S)`` of them. CPU actors (``CopierActor``, through
the same ``ShardPool`` as generate's and evaluate's) copy each output shard's samples out of the source tars and
commit it with its index part and marker, as generate does (:mod:`synthmill.sharding.units`), so a killed filter
resumes and a rerun gives the same tars. ``finish`` merges the index and writes ``lineage.json``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthmill.errors import SpecError, first_line
from synthmill.jobs import lifecycle
from synthmill.jobs.filter_spec import FilterSpec
from synthmill.jobs.outputs import VALIDATE_RETRY_S, check_output_folder, set_plan_check, versions
from synthmill.jobs.spec import node_paths
from synthmill.sharding import storage
from synthmill.sharding.layout import FAILURES, INDEX, SUMMARY, OutputLayout
from synthmill.sharding.plan import MAX_SHARDS, plan_problem
from synthmill.sharding.subset import Selection, output_schema

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
SCORES = "scores.parquet"
#: Columns that name a sample in both the index and the scores: joined on ``key``, the others must agree.
IDENTIFIERS = ("key", "shard", "prompt_index")
#: The index's row number, added for the order of the selection (not a column a condition should use).
_ROW = "__synthmill_row"
#: Kinds of output a filter reads: those with committed shards, index parts and an index.parquet.
SOURCE_KINDS = ("generate", "filter")


@dataclass
class Source:
    url: str
    plan: dict[str, Any]
    index: pa.Table
    digest: str  # sha256 over its shards' sha256, in shard order


@dataclass
class Scores:
    url: str
    table: pa.Table
    sha256: str


@dataclass
class Prepared:
    spec: FilterSpec
    source: Source
    scores: Scores | None
    selection: Selection
    counts: dict[str, int]
    inputs: dict[str, Any]  # the plan's keys that enter the fingerprint (filter_spec.INPUT_KEYS)
    schema: pa.Schema  # the output's index schema

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint(self.inputs)

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.spec.output.path, self.spec.storage)

    @property
    def num_shards(self) -> int:
        return -(-len(self.selection) // self.spec.output.samples_per_shard)


def _read_table(url: str, opts: dict[str, Any] | None, what: str) -> tuple[pa.Table, bytes]:
    try:
        data = storage.read_bytes(url, opts)
    except FileNotFoundError:
        raise SpecError(f"{url}: not found ({what})") from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"{url}: cannot be read ({e.strerror})") from None
    try:
        return pq.read_table(pa.BufferReader(data)), data
    except (pa.ArrowException, OSError) as e:
        raise SpecError(f"{url}: not a readable parquet file ({first_line(e)})") from None


def open_source(url: str, opts: dict[str, Any] | None) -> Source:
    """A complete generate or filter output at ``url``: its plan, index and shards' identity. SpecError (without
    the field, which the caller adds) for anything else."""
    plan = storage.read_plan(url, opts)
    if plan is None:
        raise SpecError(f"{url}: not a synthmill output (no plan.json)")
    kind = plan.get("kind") or "generate"
    if kind not in SOURCE_KINDS:
        raise SpecError(f"{url}: holds the output of a {kind} job; a filter reads a generate or filter output")
    problem = plan_problem(plan) if kind == "generate" else check_plan(plan) if count_like(plan) else \
        "its counts are missing"
    if problem:
        raise SpecError(f"{storage.join(url, 'plan.json')}: damaged, {problem}")
    set_plan_check("source.path", opts)(url, plan)
    n = plan["shards"]
    layout = OutputLayout(url, opts)
    done = layout.shards.done(range(n), lambda k: {"fingerprint": plan.get("fingerprint")})
    if len(done) < n or layout.read_json(SUMMARY) is None:
        raise SpecError(f"{url}: the {kind} job there is not complete ({len(done)} of {n} shards committed); run it "
                        "to the end first (the same synthmill run command resumes it)")
    index, _ = _read_table(layout.file(INDEX), opts, "the index of a complete output")
    if index.num_rows != plan["samples"] or "key" not in index.column_names or "shard" not in index.column_names:
        raise SpecError(f"{layout.file(INDEX)}: has {index.num_rows:,} rows for the {plan['samples']:,} samples of "
                        "its plan (or no key and shard columns); the output is damaged")
    digest = hashlib.sha256("\n".join(done[k]["sha256"] for k in range(n)).encode()).hexdigest()
    return Source(url, plan, index, digest)


def count_like(plan: dict[str, Any]) -> bool:
    return all(isinstance(plan.get(k), int) and not isinstance(plan.get(k), bool) for k in ("shards", "samples"))


def open_scores(path: str, opts: dict[str, Any] | None) -> Scores:
    """``scores.parquet`` of the evaluate output at ``path`` (or ``path`` itself, a .parquet file)."""
    url = path if path.lower().endswith(".parquet") else storage.join(path, SCORES)
    table, data = _read_table(url, opts, "per-sample scores: an evaluate output's scores.parquet")
    if "key" not in table.column_names:
        raise SpecError(f"{url}: has no 'key' column (its columns: {', '.join(table.column_names)})")
    if _ROW in table.column_names:
        raise SpecError(f"{url}: has a column named {_ROW}, which the filter uses itself")
    return Scores(url, table, hashlib.sha256(data).hexdigest())


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Query:
    """The index and the scores in one DuckDB connection with no access to files or settings: a view ``samples``
    of the index's columns and the scores' (a score column named like an index column other than ``key``,
    ``shard`` or ``prompt_index`` is the score's), left-joined on ``key``."""

    def __init__(self, index: pa.Table, scores: pa.Table | None):
        import duckdb

        self.con = duckdb.connect(config={"enable_external_access": False, "autoload_known_extensions": False,
                                          "autoinstall_known_extensions": False})
        self.con.register("index_t", index)
        own = [c for c in (scores.column_names if scores is not None else []) if c not in IDENTIFIERS]
        cols = [f"i.{_quote(c)}" for c in index.column_names if c not in own]
        if scores is not None:
            self.con.register("scores_t", scores)
            cols += [f"s.{_quote(c)}" for c in own]
            source = "index_t AS i LEFT JOIN scores_t AS s ON i.key = s.key"
        else:
            source = "index_t AS i"
        self.con.execute(f"CREATE TEMP VIEW samples AS SELECT {', '.join(cols)} FROM {source}")
        self.con.execute("SET lock_configuration = true")
        self.columns = [c for c in index.column_names if c != _ROW and c not in own] + own

    def rows(self, where: str) -> Any:
        """The index rows (numbers) for which ``where`` holds, in index order (numpy int64)."""
        import duckdb

        base = self.con.sql("SELECT * FROM samples")
        try:
            chosen = base.filter(where)
            kinds = base.project(where).types
        except duckdb.Error as e:
            raise SpecError(f"field 'where': {first_line(e)} (columns: {', '.join(self.columns)})") from None
        if [str(t) for t in kinds] != ["BOOLEAN"]:
            raise SpecError(f"field 'where': {where!r} gives {', '.join(map(str, kinds))}, not true or false; "
                            "write a condition such as 'clip_score > 0.28'")
        try:
            return chosen.order(_quote(_ROW)).project(_quote(_ROW)).fetchnumpy()[_ROW]
        except duckdb.Error as e:
            raise SpecError(f"field 'where': {first_line(e)}") from None

    def scalar(self, sql: str) -> Any:
        return self.con.execute(sql).fetchall()[0][0]


def check_condition(where: str, index_schema: pa.Schema, scores_schema: pa.Schema | None) -> None:
    """SpecError naming ``where`` unless DuckDB parses and binds it to one true/false value over empty tables of
    these columns."""
    empty = index_schema.append(pa.field(_ROW, pa.int64())).empty_table()
    _Query(empty, scores_schema.empty_table() if scores_schema is not None else None).rows(where)


def select(spec: FilterSpec, source: Source, scores: Scores | None) -> tuple[Selection, dict[str, int]]:
    """The samples of ``source`` for which ``spec.where`` holds (in source order), and the counts of lineage.json."""
    import numpy as np

    index = source.index
    if _ROW in index.column_names:
        raise SpecError(f"{source.url}: its index has a column named {_ROW}, which the filter uses itself")
    check_condition(spec.where, index.schema, scores.table.schema if scores else None)
    numbered = index.append_column(_ROW, pa.array(np.arange(index.num_rows, dtype=np.int64)))
    q = _Query(numbered, scores.table if scores else None)
    counts = {"source_samples": index.num_rows}
    if scores is not None:
        _check_scores(q, scores, source)
        counts["without_scores"] = q.scalar(
            "SELECT count(*) FROM index_t AS i ANTI JOIN scores_t AS s ON i.key = s.key")
    rows = q.rows(spec.where)
    chosen = index.select(["key", "shard"]).take(pa.array(rows))
    selection = Selection(chosen["key"].combine_chunks().cast(pa.string()),
                          chosen["shard"].to_numpy().astype(np.int64))
    counts.update(selected=len(selection), rejected=index.num_rows - len(selection))
    return selection, counts


def _check_scores(q: _Query, scores: Scores, source: Source) -> None:
    """Scores of this source's samples: one row per key at most, every key one of the source's, and the identifier
    columns they share with the index equal to the index's."""
    dup = q.scalar("SELECT any_value(key) FROM (SELECT key FROM scores_t GROUP BY key HAVING count(*) > 1)")
    if dup is not None:
        raise SpecError(f"scores.path {scores.url}: key {dup!r} has more than one row")
    unknown = q.scalar("SELECT min(s.key) FROM scores_t AS s ANTI JOIN index_t AS i ON s.key = i.key")
    if unknown is not None:
        raise SpecError(f"scores.path {scores.url}: key {unknown!r} is not a sample of {source.url}; are these the "
                        "scores of another output?")
    for col in IDENTIFIERS[1:]:
        if col in scores.table.column_names and col in source.index.column_names:
            bad = q.scalar(f"SELECT min(s.key) FROM scores_t AS s JOIN index_t AS i ON s.key = i.key "
                           f"WHERE s.{_quote(col)} IS DISTINCT FROM i.{_quote(col)}")
            if bad is not None:
                raise SpecError(f"scores.path {scores.url}: sample {bad!r} has another {col} than in {source.url}'s "
                                "index; are these the scores of another output?")


def prepare(spec: FilterSpec) -> Prepared:
    """Check the source, the scores, the condition and the output folder; choose the samples. Writes nothing."""
    opts = spec.storage
    field = "source.path"
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            source = _named(field, lambda: open_source(spec.source.path, opts))
            field = "scores.path"
            scores = _named(field, lambda: open_scores(spec.scores.path, opts)) if spec.scores.path else None
            field = "where"
            selection, counts = select(spec, source, scores)
            inputs = {"source_fingerprint": source.plan.get("fingerprint"), "source_digest": source.digest,
                      "scores_sha256": scores.sha256 if scores else None,
                      "selection_digest": hashlib.sha256("\n".join(selection.keys.to_pylist()).encode()).hexdigest()}
            p = Prepared(spec, source, scores, selection, counts, inputs, output_schema(source.index.schema))
            if p.num_shards > MAX_SHARDS:
                raise SpecError(f"field 'output.samples_per_shard': {len(selection):,} samples are more than "
                                f"{MAX_SHARDS:,} shards; raise it")
            field = "output.path"
            check_output_folder(spec.output.path, p.fingerprint, opts, "filter")
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    return p


def _named(field: str, fn: Any) -> Any:
    """``fn()``, its SpecError prefixed with ``field`` when it does not name one already."""
    try:
        return fn()
    except SpecError as e:
        text = str(e)
        raise SpecError(text if text.startswith((field, "field '")) else f"{field}: {text}") from None


def _done(layout: OutputLayout, shards: int, fingerprint: str, check: str = "size") -> dict[int, dict[str, Any]]:
    return layout.shards.done(range(shards), lambda k: {"fingerprint": fingerprint}, check)


def plan_summary(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: the selection and what is already done."""
    done = _done(p.layout, p.num_shards, p.fingerprint, p.spec.output.resume_check)
    return {
        "source": storage.redact_url(p.source.url),
        "scores": storage.redact_url(p.scores.url) if p.scores else None,
        "where": p.spec.where,
        **p.counts,
        "samples": len(p.selection),
        "shards": p.num_shards,
        "samples_per_shard": p.spec.output.samples_per_shard,
        "shards_done": len(done),
        "samples_done": sum(m["count"] for m in done.values()),
        "output": storage.redact_url(p.spec.output.path),
        "fingerprint": p.fingerprint,
    }


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    return (f"ok: {spec_path}: {plan['selected']} of {plan['source_samples']} samples selected -> "
            f"{plan['shards']} shards")


def done_line(summary: dict[str, Any], output: str) -> str:
    if summary.get("complete_already"):
        return (f"done already: {summary['samples']} samples in {summary['shards']} shards at {output}, complete "
                f"since {summary['finished_at']}; nothing to run")
    return (f"done: {summary['samples']} of {summary['source_samples']} samples selected into {summary['shards']} "
            f"shards at {output} ({summary['shards_resumed']} shards resumed, {summary['samples_run']} samples "
            f"copied in {summary['elapsed_s']:.1f}s, {summary['samples_per_s']:.1f} samples/s)")


class FilterJob(lifecycle.Job):
    unit_noun = "shards"

    def __init__(self, p: Prepared):
        self.p, self.spec, self.layout = p, p.spec, p.layout
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.markers = _done(self.layout, p.num_shards, p.fingerprint, p.spec.output.resume_check)
        self.resumed = len(self.markers)
        self.todo = [k for k in range(p.num_shards) if k not in self.markers]
        self.report = None
        self.n_actors = 1

    def kept(self) -> dict[str, Any] | None:
        if self.todo:
            return None
        finished = self.layout.read_json(SUMMARY)
        if (isinstance(finished, dict) and finished.get("status") == "complete"
                and finished.get("fingerprint") == self.p.fingerprint):
            return {**finished, "complete_already": True}
        return None

    def pending(self) -> bool:
        return bool(self.todo)

    def placed(self, resources: dict[str, float]) -> None:
        from synthmill.cluster.connect import actor_count, check_fits

        c = self.spec.cluster
        check_fits("copier actor", {"CPU": c.cpus_per_actor, **c.resources},
                   "cluster.cpus_per_actor" + (" / cluster.resources" if c.resources else ""),
                   f"the job waits up to cluster.start_timeout_s={c.start_timeout_s:g}s")
        cpus_only = {k: v for k, v in resources.items() if k != "GPU"}  # copying takes no accelerator
        self.n_actors, _ = actor_count(c.num_actors, cpus_only, c.cpus_per_actor)

    def plan(self) -> dict[str, Any]:
        p = self.p
        return {"kind": "filter", "fingerprint": p.fingerprint, **p.inputs, "where": p.spec.where,
                "source": storage.redact_url(p.source.url), "source_samples": p.counts["source_samples"],
                "samples": len(p.selection), "shards": p.num_shards,
                "samples_per_shard": p.spec.output.samples_per_shard}

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        import ray

        from synthmill.cluster.copier import CopierActor, CopyWork
        from synthmill.cluster.pool import ProgressBar, ShardPool

        p, spec, todo = self.p, self.spec, self.todo
        seen = tuple(node_paths(spec, ("source.path", "output.path")))  # what each actor reads and writes
        work = ray.put(CopyWork(p.source.url, self.layout.url, dict(spec.storage), p.fingerprint,
                                spec.output.samples_per_shard, p.selection, p.schema, seen))
        c = spec.cluster
        options = {"num_cpus": c.cpus_per_actor, "max_concurrency": c.inflight_per_actor + 1}
        if c.resources:
            options["resources"] = dict(c.resources)

        def make_actor():
            return CopierActor.options(**options).remote(work)

        pool = ShardPool(make_actor, min(self.n_actors, len(todo)), inflight=c.inflight_per_actor,
                         max_attempts=c.max_attempts, start_timeout_s=c.start_timeout_s, logs=self.layout)
        per = spec.output.samples_per_shard
        bar = ProgressBar(sum(min(per, len(p.selection) - k * per) for k in todo), "filter")
        try:
            def committed(k: int, marker: dict[str, Any]) -> None:
                self.markers[k] = marker
                bar.committed(marker["count"])

            self.report = pool.run(todo, committed, bar.update)
        finally:
            bar.close()
        return {f"{k:06d}": err for k, err in sorted(self.report.failed.items())}

    def failures_record(self, failures: dict[str, str]) -> dict[str, Any]:
        return {"failed_shards": failures, "shards_done": len(self.markers), "shards": self.p.num_shards}

    def failure_message(self, failures: dict[str, str]) -> str:
        return super().failure_message(failures) + " Run the same command again to retry them; done shards are kept."

    def finish(self) -> dict[str, Any]:
        from synthmill.sharding.index import merge_index

        p, layout = self.p, self.layout
        n_index = merge_index(layout, range(p.num_shards), schema=p.schema)
        if n_index != len(p.selection):
            raise RuntimeError(f"index has {n_index} rows for {len(p.selection)} samples")
        spec = p.spec
        layout.write_json(LINEAGE, {
            "source": {"path": storage.redact_url(p.source.url), "kind": p.source.plan.get("kind") or "generate",
                       "fingerprint": p.inputs["source_fingerprint"], "shards_sha256": p.inputs["source_digest"],
                       "samples": p.counts["source_samples"], "shards": p.source.plan["shards"]},
            "scores": ({"path": storage.redact_url(p.scores.url), "sha256": p.scores.sha256,
                        "rows": p.scores.table.num_rows, "columns": p.scores.table.column_names}
                       if p.scores else None),
            "condition": spec.where,
            "counts": {**p.counts, "shards": p.num_shards},
            "selection_sha256": p.inputs["selection_digest"],
            "fingerprint": p.fingerprint,
        })
        elapsed = time.perf_counter() - self.t0
        per = spec.output.samples_per_shard
        copied = sum(min(per, len(p.selection) - k * per) for k in self.todo)
        report = self.report
        return {
            "status": "complete", "kind": "filter", "fingerprint": p.fingerprint,
            **p.counts, "samples": len(p.selection), "shards": p.num_shards,
            "shards_resumed": self.resumed, "shards_run": len(self.todo), "samples_run": copied,
            "elapsed_s": round(elapsed, 3), "samples_per_s": round(copied / elapsed, 2) if copied else 0.0,
            "actors_started": report.actors_started if report else 0,
            "actors_lost": report.actors_lost if report else 0,
            "retries": sum(max(0, a - 1) for a in report.attempts.values()) if report else 0,
            "started_at": self.started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(("synthmill", "duckdb", "pyarrow", "ray", "webdataset")),
        }


def run(p: Prepared) -> dict[str, Any]:
    """Copy what is not committed yet, merge the index, write lineage.json and summary.json."""
    return lifecycle.run(FilterJob(p))


# ---- synthmill status ----

#: plan.json keys that status reads, and their types
PLAN_KEYS = {"shards": int, "samples": int, "fingerprint": str}


def check_plan(plan: dict[str, Any]) -> str | None:
    """What is wrong with a filter's plan.json beyond its keys' types, or None (an empty selection has 0 shards)."""
    n, samples, per = plan.get("shards"), plan.get("samples"), plan.get("samples_per_shard")
    if not 0 <= n <= MAX_SHARDS or samples < 0:
        return f'"shards" {n!r} or "samples" {samples!r} out of range'
    if isinstance(per, int) and per > 0 and n != -(-samples // per):
        return f'"shards" is {n:,}, but {samples:,} samples at {per:,} a shard are {-(-samples // per):,} shards'
    return None


def status(layout: OutputLayout, plan: dict[str, Any]) -> dict[str, Any]:
    markers = _done(layout, plan["shards"], plan["fingerprint"])
    failures = layout.read_json(FAILURES)
    summary = layout.read_json(SUMMARY)
    summary = summary if isinstance(summary, dict) else None
    return {
        "output": layout.url, "kind": "filter",
        "complete": bool(summary and summary.get("status") == "complete") and len(markers) == plan["shards"],
        "source": plan.get("source"), "where": plan.get("where"), "source_samples": plan.get("source_samples"),
        "shards_done": len(markers), "shards": plan["shards"],
        "samples_done": sum(m["count"] for m in markers.values()), "samples": plan["samples"],
        "failed_shards": ((failures or {}).get("failed_shards") or {}) if isinstance(failures, dict) and not summary
        else {},
    }


def render_status(st: dict[str, Any]) -> str:
    pct = 100.0 * st["samples_done"] / st["samples"] if st["samples"] else 100.0
    lines = [
        f"output     {st['output']}",
        f"state      {'complete' if st['complete'] else 'incomplete'}",
        f"source     {st['source']}",
        f"where      {st['where']}",
        f"selected   {st['samples']} of {st['source_samples']} samples",
        f"shards     {st['shards_done']} / {st['shards']} done",
        f"samples    {st['samples_done']} / {st['samples']} ({pct:.1f}%)",
    ]
    failed = st["failed_shards"]
    lines.append(f"failures   {len(failed)}" + (":" if failed else ""))
    for name, err in list(failed.items())[:10]:
        lines.append(f"  shard {name}: {err}")
    return "\n".join(lines)
