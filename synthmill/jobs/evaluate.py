"""Running an evaluate job: validate -> plan units -> skip committed partials -> scorer actors -> merge.

Every input is checked before a network loads: the weights file (downloaded and hashed when it is a
URL), the CLIP model name, the image sets (found, complete, same-sized images where that can be seen
from headers), sample counts against what each metric needs, a reference stats file's arrays and
protocol, and the output folder. Actors then score units and commit partial sums; the driver merges
them in unit order in float64 and writes ``fid_stats.npz``, ``reference_stats.npz`` (when the
reference is images) and, last, ``metrics.json``.

A study scores a model's images while its generate job runs (:func:`run_while_generated`): the units are the
generate plan's shards, as always, and each is scored once its marker is committed, so the output is the one
an evaluation of the finished images gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from synthmill.cluster.scorer import SetJob, Work
from synthmill.errors import JobFailed, SpecError
from synthmill.jobs import lifecycle
from synthmill.jobs.evaluate_spec import EvaluateSpec
from synthmill.jobs.outputs import VALIDATE_RETRY_S, check_output_folder, set_plan_check, versions
from synthmill.jobs.spec import node_paths
from synthmill.metrics import partials
from synthmill.metrics.base import Finish
from synthmill.metrics.registry import FEATURES, METRICS, NETWORKS, features_of, networks_of, per_sample_of
from synthmill.metrics.scores import (
    KEY_COLUMNS,
    SampleScores,
    category_table,
    load_categories,
    parquet_bytes,
    with_categories,
)
from synthmill.sharding import storage
from synthmill.sharding.images import (
    ImageSetError,
    check_first_sample,
    check_pixels,
    committed_shards,
    first_image_size,
    image_size,
    open_image_set,
)
from synthmill.sharding.layout import FAILURES, SCORES, OutputLayout
from synthmill.sharding.layout import METRICS as METRICS_FILE

log = logging.getLogger(__name__)

#: Seconds between two looks at a running generate job's committed shards (more when a look takes long).
POLL_S = 0.5

#: The libraries every evaluation records the versions of; each metric adds its own (``Metric.libraries``).
CORE_LIBRARIES = ("synthmill", "torch", "torchvision", "numpy", "pillow", "pyarrow", "webdataset", "fsspec", "ray")

#: How the per-unit statistics are kept and merged, in metrics.json's protocol.
STATISTICS = ("per unit its float32 features (float64 sums from 4,096 samples), added to float64 sums in unit "
              "order; covariance with divisor n-1")


@dataclass
class Prepared:
    spec: EvaluateSpec
    sets: dict[str, SetJob]
    reference_stats: dict[str, Any] | None  # metric -> the statistics standing in for the reference images, or None
    info: dict[str, dict[str, Any]]  # network name -> what its check found (the Inception weights' path and sha256)
    fingerprint: str
    categories: tuple[str, dict[str, list[str | None]]] | None = None  # (the prompts file, column -> each prompt's)

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.spec.output.path, self.spec.storage)

    @property
    def weights_sha256(self) -> str | None:
        return self.info.get("inception", {}).get("sha256")


def _check_networks(spec: EvaluateSpec, wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, Any]]:
    """Each network the ``wanted`` features need -> what its check found (weights' path and sha256, ...)."""
    needed = networks_of(tuple(f for fs in wanted.values() for f in fs))
    return {n: NETWORKS[n].check(spec, spec.storage) for n in needed}


def job_fingerprint(spec: EvaluateSpec, info: dict[str, dict[str, Any]]) -> str:
    """The job's fingerprint from its settings and what the networks' checks found (``info``): the one
    :func:`prepare` and :func:`check_before_generated` both give."""
    return spec.fingerprint(info.get("inception", {}).get("sha256"), networks_sha256(info))


def networks_sha256(info: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The digests of the weights files of the networks other than Inception (whose digest has its own key):
    what their checks found, for the job's fingerprint."""
    return {name: found["sha256"] for name, found in sorted(info.items())
            if name != "inception" and found.get("sha256")}


def _check_headers(name: str, job: SetJob, opts: dict[str, Any] | None, same_size: bool) -> tuple[int, int] | None:
    """What image headers tell before anything is decoded: every image within ``NAME.max_image_pixels`` and, with
    ``same_size``, of one size, which is returned. Reads every header of a local folder, else the first image's
    (the scorers check the rest, each before decoding it)."""
    images, limit, field = job.images, job.max_pixels, f"{name}.max_image_pixels"
    if images.image_size is not None:  # a generate output: its job.yaml gives every image's size
        check_pixels(images.image_size, limit, f"{images.path} (sampling.width x sampling.height)", field)
        return images.image_size if same_size else None
    size = first_image_size(images.first_unit, opts, limit, field)
    if images.kind == "folder" and storage.is_local(images.path):
        for unit in images.units:
            for f in unit.files:
                w, h = image_size(f, f)
                check_pixels((w, h), limit, f, field)
                if same_size and (w, h) != size:
                    raise SpecError(
                        f"{name}.path: {f} is {w}x{h}, the first image is {size[0]}x{size[1]}; "
                        "images of mixed sizes (set fid.resize_to to score every image at one size)")
    return size if same_size else None


def _check_counts(spec: EvaluateSpec, samples: dict[str, int | None]) -> None:
    """Each metric's minimum sample counts; None (not known before scoring) passes."""
    for m in spec.metrics:
        METRICS[m].check(spec, samples)


def category_columns(spec: EvaluateSpec) -> list[str]:
    """The prompt columns ``categories`` names (``column``, or each of ``columns``)."""
    c = spec.categories
    return [c.column] if c.column is not None else list(c.columns)


def _categories(spec: EvaluateSpec, gen: Any, opts: dict[str, Any] | None
                ) -> tuple[str, dict[str, list[str | None]]] | None:
    """The prompts file named by ``categories`` and, for each category column, each prompt's category (row i:
    prompt_index i), or None."""
    import yaml

    names = category_columns(spec)
    if not names:
        return None
    field = "categories.column" if spec.categories.column is not None else "categories.columns"
    wanted = per_sample_of(features_of(spec.metrics, "generated"))
    if not wanted:
        raise SpecError(f"{field}: none of the metrics {', '.join(spec.metrics)} gives a number per sample "
                        "to average per category")
    if gen.kind != "synthmill":
        raise SpecError(f"{field}: the generated set {gen.path} is not a synthmill generate output, so "
                        "its samples have no prompt_index to join the categories on")
    taken = {name for name, _ in KEY_COLUMNS} | {"nsfw"} | {f.per_sample.column for f in wanted}
    for name in names:  # each becomes a column of scores.parquet too
        if name in taken:
            raise SpecError(f"{field} {name!r}: already the name of a scores.parquet column "
                            f"({', '.join(sorted(taken))})")
    plan = storage.read_plan(gen.path, opts) or {}
    path = spec.categories.path
    if path is None:  # the prompts the generate job read, as its job.yaml names them (absolute when local)
        job_url = storage.join(gen.path, "job.yaml")
        try:
            job = yaml.safe_load(storage.read_bytes(job_url, opts))
            path = job["prompts"]["path"]
        except (FileNotFoundError, yaml.YAMLError, KeyError, TypeError):
            raise SpecError(f"categories.path: {job_url} names no prompts.path; give categories.path") from None
    by_column = {}
    for name in names:
        try:
            by_column[name] = load_categories(path, name, opts, int(plan.get("prompts") or 0))
        except SpecError as e:
            message = str(e)
            raise SpecError(message.replace("categories.column ", f"{field} ", 1)) from None
    return path, by_column


def _reference(spec: EvaluateSpec, info: dict[str, dict[str, Any]], wanted: tuple[str, ...]
               ) -> tuple[dict[str, Any] | None, SetJob | None]:
    """The reference statistics standing in for the reference images (a stats .npz), or the reference image set."""
    opts = spec.storage
    if not wanted:
        return None, None
    rpath = spec.reference.path
    loaders = {m: METRICS[m].reference_stats for m in spec.metrics if METRICS[m].reference_stats}
    if rpath.endswith(".npz") and loaders:
        images_only = [m for m in spec.metrics if METRICS[m].features.get("reference") and m not in loaders]
        if images_only:
            raise SpecError(f"reference.path {rpath}: {images_only[0]} needs the reference images, not a stats file")
        return {m: load(rpath, opts, spec, info) for m, load in loaders.items()}, None
    images = open_image_set(rpath, opts, spec.reference.samples_per_unit, set_plan_check("reference.path", opts))
    return None, SetJob(images, wanted, max_pixels=spec.reference.max_image_pixels, name="reference")


def check_before_generated(spec: EvaluateSpec) -> str:
    """Check what an evaluation reads besides its generated set, which does not exist yet (a study checks its
    evaluation before the images are made): the networks' weights, the reference and the output folder. Returns
    the evaluation's fingerprint. :func:`prepare` checks all of it again, with the generated set, before it runs."""
    opts = spec.storage
    wanted = {name: features_of(spec.metrics, name) for name in ("generated", "reference")}
    field = "fid.weights"
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            info = _check_networks(spec, wanted)
            field = "reference.path"
            _, ref_set = _reference(spec, info, wanted["reference"])
            if ref_set is not None:
                ref_set.size = _check_headers("reference", ref_set, opts,
                                              any(NETWORKS[n].same_size(spec) for n in ref_set.networks))
            fingerprint = job_fingerprint(spec, info)
            field = "output.path"
            check_output_folder(spec.output.path, fingerprint, opts, "evaluate")
    except ImageSetError as e:
        raise SpecError(f"{field}: {e}") from None
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    return fingerprint


def prepare(spec: EvaluateSpec, growing: bool = False) -> Prepared:
    """Check every input without loading a network or writing anything; plan the units. ``growing``: the generated
    set is a generate output whose job is still running, with a shard committed (see :func:`run_while_generated`)."""
    opts = spec.storage
    wanted = {name: features_of(spec.metrics, name) for name in ("generated", "reference")}
    field = "fid.weights"
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            info = _check_networks(spec, wanted)
            sets: dict[str, SetJob] = {}
            field = "generated.path"
            gen = open_image_set(spec.generated.path, opts, spec.generated.samples_per_unit,
                                 set_plan_check(field, opts), growing)
            sets["generated"] = SetJob(gen, wanted["generated"], max_pixels=spec.generated.max_image_pixels)
            if sets["generated"].captions:  # the rest are checked as they are scored
                check_first_sample(gen, opts, sets["generated"].captions, spec.generated.max_image_pixels,
                                   "generated.max_image_pixels")
            field = "reference.path"
            ref_stats, ref_set = _reference(spec, info, wanted["reference"])
            if ref_set is not None:
                sets["reference"] = ref_set
            for name, job in sets.items():
                field = f"{name}.path"
                job.size = _check_headers(name, job, opts, any(NETWORKS[n].same_size(spec) for n in job.networks))
            _check_counts(spec, {name: job.images.num_samples for name, job in sets.items()})
            field = "categories.path"
            categories = _categories(spec, gen, opts)
            fingerprint = job_fingerprint(spec, info)
            field = "output.path"
            check_output_folder(spec.output.path, fingerprint, opts, "evaluate")
    except ImageSetError as e:
        raise SpecError(f"{field}: {e}") from None
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    return Prepared(spec, sets, ref_stats, info, fingerprint, categories)


def _identities(job: SetJob) -> dict[int, str]:
    """Unit -> identity, of the units there are (a growing set's committed shards)."""
    return {u.index: u.identity for u in job.images.units if u.identity is not None}


def plan_summary(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: the units of each set and how many are already scored."""
    out: dict[str, Any] = {"metrics": list(p.spec.metrics), "protocol": p.spec.fid.protocol,
                           "resize_to": p.spec.fid.resize_to, "output": storage.redact_url(p.spec.output.path),
                           "fingerprint": p.fingerprint}
    for name, job in p.sets.items():
        done = partials.done(p.spec.output.path, name, _identities(job), p.fingerprint, p.spec.storage, job.keyed)
        out[name] = {"path": storage.redact_url(job.images.path), "kind": job.images.kind,
                     "units": len(job.images.units), "samples": job.images.num_samples, "units_done": len(done)}
    if p.reference_stats is not None:
        out["reference"] = {"path": storage.redact_url(p.spec.reference.path), "kind": "stats"}
    return out


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    sets = [f"{name} {plan[name]['samples'] if plan[name]['samples'] is not None else '?'} samples in "
            f"{plan[name]['units']} units" for name in ("generated", "reference") if "units" in plan.get(name, {})]
    if plan.get("reference", {}).get("kind") == "stats":
        sets.append(f"reference stats {plan['reference']['path']}")
    return f"ok: {spec_path}: {', '.join(plan['metrics'])} over {'; '.join(sets)}"


def done_line(summary: dict[str, Any], output: str) -> str:
    m = summary["metrics"]
    parts = []
    if "fid" in m:
        # two identical sets: the exact 0 comes out of float64 as +-1e-12; "-0.0000" would read as a sign
        parts.append(f"FID {round(m['fid'], 4) + 0.0:.4f}")
    if "inception_score" in m:
        parts.append(f"IS {m['inception_score']['mean']:.4f} +- {m['inception_score']['std']:.4f}")
    if "clip_score" in m:
        parts.append(f"CLIP score {m['clip_score']:.4f} (x100: {m['clip_score_x100']:.2f})")
    parts += [f"{key} {value:.4f}" for key, value in m.items() if key not in _SHOWN and isinstance(value, float)]
    samples = ", ".join(f"{k} {v}" for k, v in summary["samples"].items())
    return (f"done: {'; '.join(parts) or 'statistics written'} ({samples} samples; {summary['units_resumed']} units "
            f"resumed, {summary['units_run']} scored in {summary['elapsed_s']:.1f}s) -> {output}/{METRICS_FILE}")


#: metrics.json entries the done line names in its own words; any other number a metric gives is shown as it is.
_SHOWN = {"fid", "inception_score", "clip_score", "clip_score_x100"}


class EvaluateJob(lifecycle.Job):
    """An evaluation; ``ended``: of a growing set (:func:`prepare` with ``growing``), whether its generate job has
    ended, so that no more shards will be committed; ``failed``: whether it ended without its output (then the
    scoring stops at once: see :func:`run_while_generated`); ``give_way``: whether its generators wait to start
    (then the scorers free their places as they become idle)."""

    final_file = METRICS_FILE

    def __init__(self, p: Prepared, ended: Callable[[], bool] | None = None, failed: Callable[[], bool] | None = None,
                 give_way: Callable[[], bool] | None = None):
        self.p, self.spec, self.layout = p, p.spec, p.layout
        self.ended, self.failed, self.give_way = ended, failed, give_way
        self.next_look = 0.0  # a growing set's next look at its committed shards (time.monotonic)
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.markers = {name: partials.done(self.layout.url, name, _identities(job), p.fingerprint, self.layout.opts,
                                            job.keyed)
                        for name, job in p.sets.items()}
        self.todo = [(name, u.index) for name, job in p.sets.items() for u in job.images.units
                     if u.index not in self.markers[name] and u.identity is not None]  # a growing set's: committed
        self.resumed = sum(len(m) for m in self.markers.values())
        self.report = None

    @property
    def waiting(self) -> list[int]:
        """The units whose shards are not committed yet (a growing set's)."""
        return self.p.sets["generated"].images.waiting if self.ended is not None else []

    def pending(self) -> bool:
        return bool(self.todo) or bool(self.waiting)

    def placed(self, resources: dict[str, float]) -> None:
        from synthmill.cluster.connect import check_actor_fits

        check_actor_fits(self.spec.cluster, resources)

    def plan(self) -> dict[str, Any]:
        log.info("%d units to score, %d already scored", len(self.todo), self.resumed)
        return {"kind": "evaluate", "fingerprint": self.p.fingerprint, "weights_sha256": self.p.weights_sha256,
                "networks_sha256": networks_sha256(self.p.info),
                "sets": {n: {"path": storage.redact_url(j.images.path), "units": len(j.images.units),
                             "samples": j.images.num_samples} for n, j in self.p.sets.items()}}

    def work(self, resources: dict[str, float]) -> dict[str, str]:
        import ray

        from synthmill.cluster.connect import actor_count, actor_options
        from synthmill.cluster.pool import ProgressBar, ShardPool
        from synthmill.cluster.scorer import ScorerActor

        p, spec, todo = self.p, self.spec, self.todo  # a growing set's tasks are added to todo as its shards commit
        n_actors, use_gpu = actor_count(spec.cluster.num_actors, resources, spec.cluster.cpus_per_actor)
        n_actors = min(n_actors, len(todo) + len(self.waiting))
        seen = node_paths(spec, (*(f"{name}.path" for name in p.sets), "output.path"))  # what each actor reads
        work = ray.put(Work(p.sets, todo, p.fingerprint, p.info, self.layout.url, spec.storage, seen))
        options = actor_options(spec.cluster, use_gpu)

        def make_actor():
            return ScorerActor.options(**options).remote(spec, work)

        def on_result(t: int, marker: dict[str, Any]) -> None:
            if "bad_input" in marker:
                raise SpecError(marker["bad_input"])
            set_name, k = todo[t]
            self.markers[set_name][k] = marker
            bar.committed(marker["count"])

        def task(t: int) -> tuple[tuple[str, Any]]:  # the unit itself: a growing set's is not in ``work``
            set_name, k = todo[t]
            return ((set_name, p.sets[set_name].images.units[k]),)

        units = [p.sets[s].images.units[k] for s, k in todo] + [p.sets["generated"].images.units[k]
                                                                 for k in self.waiting]
        pool = ShardPool(make_actor, n_actors, method="process", inflight=spec.cluster.inflight_per_actor,
                         max_attempts=spec.cluster.max_attempts, start_timeout_s=spec.cluster.start_timeout_s,
                         logs=self.layout, unit=lambda t: f"unit {todo[t][0]}/{todo[t][1]:06d}", task_args=task)
        bar = ProgressBar(sum(u.count or 0 for u in units), "evaluate")
        try:
            self.report = pool.run(list(range(len(todo))), on_result, bar.update,
                                   self._committed_since if self.ended is not None else None, self.give_way)
        finally:
            bar.close()
        failed = {f"{todo[t][0]}/{todo[t][1]:06d}": err for t, err in sorted(self.report.failed.items())}
        for k in self.waiting:  # the generate job ended without them (its own failure names why), or no scorer ran
            failed[f"generated/{k:06d}"] = "not scored: its shard was not committed while the evaluation ran"
        return failed

    def _committed_since(self) -> tuple[list[int], bool]:
        """The tasks of a growing set's shards committed since the last look, and whether more may come: the
        scorer pool's ``feed``. A shard whose partial is already committed (a killed run's) is not scored again.
        Raises GenerateFailed once the generate job has failed: the pool then stops its scorers."""
        if self.failed is not None and self.failed():
            raise GenerateFailed(self.p.sets["generated"].images.path)
        if time.monotonic() < self.next_look:
            return [], True
        ended = self.ended()  # before looking: this look then sees every shard of a job that has ended
        t0 = time.monotonic()
        job = self.p.sets["generated"]
        units = job.images.committed_since(self.spec.storage)
        new = []
        if units:
            done = partials.done(self.layout.url, "generated", {u.index: u.identity for u in units},
                                 self.p.fingerprint, self.layout.opts, job.keyed)
            self.markers["generated"].update(done)
            self.resumed += len(done)
            for u in units:
                if u.index not in done:
                    self.todo.append(("generated", u.index))
                    new.append(len(self.todo) - 1)
        self.next_look = time.monotonic() + max(POLL_S, 10 * (time.monotonic() - t0))
        return new, bool(self.waiting) and not ended

    def failure_message(self, failures: dict[str, str]) -> str:
        return super().failure_message(failures) + " Run the same command again to retry them; scored units are kept."

    def _merge(self, name: str) -> tuple[int, dict[str, Any], SampleScores | None]:
        """The set's sample count, each feature's total over its partials, added in unit order, and its
        per-sample numbers when it has any."""
        job, markers = self.p.sets[name], self.markers[name]
        totals = {f: FEATURES[f].total() for f in job.features}
        scores = None
        if job.keyed:
            index = None
            if job.images.kind == "synthmill":  # unit k is shard k, whose rows index/K.parquet holds
                shards = OutputLayout(job.images.path, self.layout.opts).shards
                index = lambda k: shards.companion_url(0, k)  # noqa: E731
            scores = SampleScores(per_sample_of(job.features), index, self.layout.opts)
        units = range(len(job.images.units))
        for k, part in zip(units, partials.load_in_order(self.layout.url, name, units, self.layout.opts), strict=True):
            for t in totals.values():
                t.add(part, markers[k])
            if scores is not None:
                scores.add(k, part, partials.KEYS)
        return sum(int(m["count"]) for m in markers.values()), totals, scores

    def finish(self) -> dict[str, Any]:
        from synthmill.metrics.inception import PROTOCOLS, RESIZE_TO

        p, spec, layout = self.p, self.spec, self.layout
        samples, totals, scores = {}, {}, {}
        for name in p.sets:
            samples[name], totals[name], scores[name] = self._merge(name)
        _check_counts(spec, samples)

        def write(file_name: str, data: bytes) -> str:
            storage.write_bytes(layout.file(file_name), data, layout.opts)
            return layout.file(file_name)

        ref = p.sets.get("reference")
        stats = p.reference_stats or {}
        fin = Finish(spec, totals, samples, p.info, stats.get("fid"), ref.images.kind if ref else None,
                     write, references=stats)
        metrics: dict[str, Any] = {}
        for name, metric in METRICS.items():
            if name in spec.metrics:
                metrics.update(metric.finish(fin))
        protocol = {"fid": spec.fid.protocol, "fid_preprocessing": PROTOCOLS[spec.fid.protocol],
                    "resize_to": spec.fid.resize_to, "resize_to_method": RESIZE_TO if spec.fid.resize_to else None}
        for name, metric in METRICS.items():
            if metric.protocol:
                key, describe = metric.protocol
                protocol[key] = describe(spec) if name in spec.metrics else None
        protocol.update(statistics=STATISTICS, tf32=False)
        per_sample = self._write_scores(scores.get("generated"), write)
        report, sha = self.report, p.weights_sha256
        return {
            "status": "complete",
            "kind": "evaluate",
            "metrics": metrics,
            **per_sample,
            "samples": samples,
            "protocol": protocol,
            "weights": ({"file": spec.fid.weights or "standard (pytorch-fid's URL)", "sha256": sha,
                         "standard": bool(sha and sha.startswith("6726825d"))} if sha else None),
            "units": {n: len(j.images.units) for n, j in p.sets.items()},
            "units_resumed": self.resumed,
            "units_run": len(self.todo),
            "samples_scored": sum(p.sets[s].images.units[k].count or 0 for s, k in self.todo),
            "elapsed_s": round(time.perf_counter() - self.t0, 3),
            "devices": sorted({i["device"] for i in report.actor_infos}) if report else [],
            "actors_lost": report.actors_lost if report else 0,
            "started_at": self.started.isoformat(timespec="seconds"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions((*CORE_LIBRARIES, *dict.fromkeys(
                lib for name, m in METRICS.items() if name in spec.metrics for lib in m.libraries))),
        }

    def _write_scores(self, scores: SampleScores | None, write: Any) -> dict[str, Any]:
        """Write ``scores.parquet`` (when a metric gives one number per image) and return metrics.json's entries
        about it: the file and its columns, and the per-category table when ``categories`` asks for one."""
        if scores is None:
            return {}
        table = scores.table()
        columns = tuple(f.per_sample.column for f in scores.features)
        tables: dict[str, Any] = {}
        if self.p.categories is not None:  # each category column joins the table and gets its table of means
            path, by_column = self.p.categories
            for name, categories in by_column.items():
                tables[name] = category_table(table, categories, columns)
            table = with_categories(table, by_column)
        write(SCORES, parquet_bytes(table))
        out: dict[str, Any] = {"scores": {"file": SCORES, "rows": table.num_rows, "columns": table.column_names}}
        if tables:
            where = storage.redact_url(path)
            if self.spec.categories.column is not None:
                out["categories"] = {"column": self.spec.categories.column, "path": where, **tables[name]}
            else:
                out["categories"] = {"columns": list(tables), "path": where, "by_column": tables}
        return out


class GenerateFailed(JobFailed):
    """The generate job whose shards an evaluation scores as they are committed failed: nothing is merged."""

    def __init__(self, path: str):
        super().__init__(f"generated.path {storage.redact_url(path)}: its generate job failed; the units scored are "
                         "kept, nothing is merged")


def run(p: Prepared, ended: Callable[[], bool] | None = None, failed: Callable[[], bool] | None = None,
        give_way: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Score what is not scored yet, merge, and write the stats files and ``metrics.json``. ``ended``, ``failed``,
    ``give_way``: see :class:`EvaluateJob`."""
    return lifecycle.run(EvaluateJob(p, ended, failed, give_way))


def run_while_generated(spec: EvaluateSpec, ended: Callable[[], bool], fingerprint: str, shards: int,
                        failed: Callable[[], bool] | None = None,
                        give_way: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Evaluate the images of a generate job that is running (a study's model): score each shard once its marker is
    committed, and merge once ``ended()`` (the generate job returned or failed) and every shard is scored. The
    output is the one :func:`run` gives on the finished images: the units are the plan's shards either way.

    Once ``failed()`` (the generate job failed or raised: its output will not be complete), the scoring stops at
    once: the scorers are stopped, the partials committed are kept for a rerun, nothing is merged, and it raises
    :class:`GenerateFailed` (or returns None, if it had not started). While ``give_way()`` (the generate job has an
    actor starting, say a replacement of one that died), the scorers free their places as they become idle, so
    that a cluster they fill cannot keep the generators from starting, and the shards from ever coming.

    Waits until the generate output's plan.json is this run's (its ``fingerprint`` and number of ``shards``: a
    rerun's plan.json may be an earlier run's until the job claims its folder again) and the job has committed a
    shard since the first look (the shards found then are an earlier run's), or has ended; then checks everything
    as :func:`prepare` does. So the scorers start once the generators hold their place in the cluster, which
    scorers started earlier could take (a cluster with room for one actor would then wait for ever). Returns None
    when the generate job ended with no shard committed (its failure says why)."""
    images = spec.generated.path
    earlier: set[int] | None = None  # the shards committed at the first look
    while True:
        if failed is not None and failed():
            return None
        over = ended()
        found = storage.read_plan(images, spec.storage)
        if isinstance(found, dict) and (found.get("fingerprint"), found.get("shards")) == (fingerprint, shards):
            if earlier is None:
                earlier, new = set(committed_shards(images, found, spec.storage, range(shards))), False
            else:  # only the shards not committed then are looked at again
                rest = [k for k in range(shards) if k not in earlier]
                new = bool(committed_shards(images, found, spec.storage, rest))
            if new or (over and earlier):
                break
        if over:
            return None
        time.sleep(POLL_S)
    return run(prepare(spec, growing=True), ended, failed, give_way)


# ---- synthmill status ----

#: plan.json keys that status reads, and their types
PLAN_KEYS = {"sets": dict, "fingerprint": str}


def check_plan(plan: dict[str, Any]) -> str | None:
    """What is wrong with a plan.json of this kind beyond its keys' types, or None."""
    from synthmill.sharding.plan import MAX_SHARDS

    if not plan["sets"]:
        return "its 'sets' is empty"
    for name, v in plan["sets"].items():
        units = v.get("units") if isinstance(v, dict) else None
        if not isinstance(units, int) or isinstance(units, bool):
            return f"a set in its 'sets' has no count of units ({name!r})"
        if not 1 <= units <= MAX_SHARDS:
            return f"the set {name!r} has {units:,} units, not a whole number in 1..{MAX_SHARDS:,}"
        samples = v.get("samples")
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 0):
            return f"the set {name!r} has {samples!r} samples, not a whole number"
    return None


def status(layout: OutputLayout, plan: dict[str, Any]) -> dict[str, Any]:
    """The state of an evaluate output: units with a committed partial of this job, per set; the metrics."""
    sets = {}
    for name, info in plan["sets"].items():
        units = layout.partials(name)
        names = storage.list_sizes(units.folder, layout.opts)
        done = [n for n in names if n.endswith(".json") and n[:-5] + ".npz" in names
                and (storage.read_json(storage.join(units.folder, n), layout.opts, damaged_as_missing=True) or {}
                     ).get("fingerprint") == plan["fingerprint"]]
        sets[name] = {"units_done": len(done), "units": info["units"], "samples": info.get("samples")}
    result = _object(layout.read_json(METRICS_FILE))
    failures = _object(layout.read_json(FAILURES)) or {}
    return {
        "output": layout.url, "kind": "evaluate",
        "complete": bool(result and result.get("status") == "complete"),
        "sets": sets,
        "metrics": result.get("metrics") if result else None,
        "failed_units": (failures.get("failed_units") or {}) if not result else {},
    }


def _object(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def render_status(st: dict[str, Any]) -> str:
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
