"""Running an evaluate job: validate -> plan units -> skip committed partials -> scorer actors -> merge.

Every input is checked before a network loads: the weights file (downloaded and hashed when it is a
URL), the CLIP model name, the image sets (found, complete, same-sized images where that can be seen
from headers), sample counts against what each metric needs, a reference stats file's arrays and
protocol, and the output folder. Actors then score units and commit partial sums; the driver merges
them in unit order in float64 and writes ``fid_stats.npz``, ``reference_stats.npz`` (when the
reference is images) and, last, ``metrics.json``.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from synthmill.cluster.scorer import SetJob, Work
from synthmill.errors import JobFailed, SpecError
from synthmill.jobs.evaluate_spec import EvaluateSpec
from synthmill.jobs.generate import VALIDATE_RETRY_S
from synthmill.jobs.outputs import check_output_folder, versions, write_job_yaml
from synthmill.metrics import partials
from synthmill.metrics.frechet import GaussianSums, frechet_distance
from synthmill.sharding import storage
from synthmill.sharding.images import (
    ImageSet,
    ImageSetError,
    check_first_sample,
    first_image_size,
    image_size,
    open_image_set,
)

log = logging.getLogger(__name__)

FID_DIM = 2048


@dataclass
class ReferenceStats:
    """A reference given as statistics: mu, sigma and whatever synthmill recorded beside them."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]


@dataclass
class Prepared:
    spec: EvaluateSpec
    sets: dict[str, SetJob]
    reference_stats: ReferenceStats | None
    weights_path: str | None
    weights_sha256: str | None
    fingerprint: str


def _load_stats(path: str, opts: dict[str, Any] | None) -> ReferenceStats:
    try:
        data = storage.read_bytes(path, opts)
    except FileNotFoundError:
        raise SpecError(f"reference.path {path}: file not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"reference.path {path}: cannot read it ({e.strerror})") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise SpecError(f"reference.path {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise SpecError(f"reference.path {path}: needs arrays 'mu' and 'sigma' (has: {', '.join(arrays) or 'none'})")
    for key in ("mu", "sigma"):
        if arrays[key].dtype.kind not in "iuf":
            raise SpecError(f"reference.path {path}: {key} holds {arrays[key].dtype.name} values, not real numbers")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.shape != (FID_DIM,) or sigma.shape != (FID_DIM, FID_DIM):
        raise SpecError(f"reference.path {path}: mu {mu.shape} and sigma {sigma.shape} must be ({FID_DIM},) and "
                        f"({FID_DIM}, {FID_DIM}) (pool3 statistics of the FID Inception network)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SpecError(f"reference.path {path}: mu or sigma holds NaN or infinite values")
    if (np.diag(sigma) < 0).any() or not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
        raise SpecError(f"reference.path {path}: sigma is not a covariance matrix (it must be symmetric, with no "
                        "negative variance on its diagonal)")
    meta = {k: v.item() for k, v in arrays.items() if k not in ("mu", "sigma") and v.ndim == 0}
    odd = [k for k in ("protocol", "resize_to", "weights_sha256") if k in arrays and arrays[k].ndim != 0]
    if odd:  # what _check_reference_meta compares: an array there would skip the check
        raise SpecError(f"reference.path {path}: '{odd[0]}' is an array of shape {arrays[odd[0]].shape}, not the "
                        "single value that says how the statistics were made")
    return ReferenceStats(path, mu, sigma, meta)


def _check_reference_meta(ref: ReferenceStats, spec: EvaluateSpec, sha: str | None) -> None:
    """Stats written by synthmill say how they were made; refuse to compare across protocols."""
    want = {"protocol": spec.fid.protocol, "resize_to": spec.fid.resize_to or 0, "weights_sha256": sha}
    for key, value in want.items():
        if key in ref.meta and ref.meta[key] != value:
            # a stats file stores resize_to null (images at their own size) as 0: say it as the spec does
            theirs, ours = ((None if v == 0 else v) for v in (ref.meta[key], value)) if key == "resize_to" else (
                ref.meta[key], value)
            field = {"weights_sha256": "fid.weights of sha256"}.get(key, f"fid.{key}")
            raise SpecError(f"reference.path {ref.path}: was computed with {field}={theirs!r}, this job uses "
                            f"{field}={ours!r}; FID across protocols is not comparable")


def _check_sizes(name: str, images: ImageSet, opts: dict[str, Any] | None) -> tuple[int, int]:
    """The size every image of the set must share; checks every header of a local folder."""
    if images.image_size is not None:
        return images.image_size
    size = first_image_size(images.units[0], opts)
    if images.kind == "folder" and storage.is_local(images.path):
        for unit in images.units:
            for f in unit.files:
                w, h = image_size(f, f)
                if (w, h) != size:
                    raise SpecError(
                        f"{name}.path: {f} is {w}x{h}, the first image is {size[0]}x{size[1]}; "
                        "images of mixed sizes (set fid.resize_to to score every image at one size)")
    return size


def _need(metric: str, name: str, n: int | None, at_least: int, why: str) -> None:
    if n is not None and n < at_least:
        raise SpecError(f"{name}: {metric} needs at least {at_least} samples ({why}), the set has {n}")


def _check_counts(spec: EvaluateSpec, gen: int | None, ref: int | None = None) -> None:
    """Each metric's minimum sample count; None (not known before scoring) passes."""
    if spec.needs_fid_features:
        _need("fid", "generated.path", gen, 2, "a covariance needs two")
    _need("fid", "reference.path", ref, 2, "a covariance needs two")
    if "is" in spec.metrics:
        _need("is", "generated.path", gen, spec.inception_score.splits,
              f"one per split, inception_score.splits={spec.inception_score.splits}")
    if "clip" in spec.metrics:
        _need("clip", "generated.path", gen, 1, "one image with its caption")


def prepare(spec: EvaluateSpec) -> Prepared:
    """Check every input without loading a network or writing anything; plan the units."""
    from synthmill.metrics import weights

    opts = spec.storage
    path, sha = None, None
    field = "fid.weights"
    try:
        with storage.retry_budget(VALIDATE_RETRY_S):
            if spec.needs_fid_features or "is" in spec.metrics:
                try:
                    path, sha = weights.resolve(spec.fid.weights, spec.fid.weights_sha256, opts)
                    weights.check_fid_inception(weights.load_state_dict(path), path)
                except weights.WeightsError as e:
                    raise SpecError(f"fid.weights: {e}") from None
            if "clip" in spec.metrics:
                from synthmill.metrics.clipscore import known_model

                problem = known_model(spec.clip.model, spec.clip.pretrained)
                if problem:
                    raise SpecError(problem)
            sets: dict[str, SetJob] = {}
            field = "generated.path"
            gen = open_image_set(spec.generated.path, opts, spec.generated.samples_per_unit)
            if "clip" in spec.metrics:  # the rest are checked as they are scored
                check_first_sample(gen, opts, "the clip metric scores each image against its caption")
            sets["generated"] = SetJob(gen, fid=spec.needs_fid_features, isc="is" in spec.metrics,
                                       clip="clip" in spec.metrics)
            ref_stats = None
            field = "reference.path"
            if "fid" in spec.metrics:
                rpath = spec.reference.path
                if rpath.endswith(".npz"):
                    ref_stats = _load_stats(rpath, opts)
                    _check_reference_meta(ref_stats, spec, sha)
                else:
                    sets["reference"] = SetJob(open_image_set(rpath, opts, spec.reference.samples_per_unit), fid=True)
            if spec.fid.resize_to is None:
                for name, job in sets.items():
                    if job.fid or job.isc:
                        field = f"{name}.path"
                        job.size = _check_sizes(name, job.images, opts)
            _check_counts(spec, gen.num_samples, sets["reference"].images.num_samples if "reference" in sets else None)
            fingerprint = spec.fingerprint(sha)
            field = "output.path"
            check_output_folder(spec.output.path, fingerprint, opts, "evaluate")
    except ImageSetError as e:
        raise SpecError(f"{field}: {e}") from None
    except storage.StorageError as e:
        raise SpecError(f"{field}: {e}") from None
    return Prepared(spec, sets, ref_stats, path, sha, fingerprint)


def _identities(job: SetJob) -> dict[int, str]:
    return {u.index: u.identity for u in job.images.units}


def plan_summary(p: Prepared) -> dict[str, Any]:
    """What ``--dry-run`` prints: the units of each set and how many are already scored."""
    out: dict[str, Any] = {"metrics": list(p.spec.metrics), "protocol": p.spec.fid.protocol,
                           "resize_to": p.spec.fid.resize_to, "output": storage.redact_url(p.spec.output.path),
                           "fingerprint": p.fingerprint}
    for name, job in p.sets.items():
        done = partials.done(p.spec.output.path, name, _identities(job), p.fingerprint, p.spec.storage)
        out[name] = {"path": storage.redact_url(job.images.path), "kind": job.images.kind, "units": len(job.images.units),
                     "samples": job.images.num_samples, "units_done": len(done)}
    if p.reference_stats is not None:
        out["reference"] = {"path": storage.redact_url(p.reference_stats.path), "kind": "stats"}
    return out


def _stats_file(mu: np.ndarray, sigma: np.ndarray, n: int, p: Prepared) -> bytes:
    """mu and sigma as pytorch-fid writes them, plus how they were made (pytorch-fid ignores the rest)."""
    return partials.npz_bytes({"mu": mu, "sigma": sigma, "n": np.array(n), "protocol": np.array(p.spec.fid.protocol),
                               "resize_to": np.array(p.spec.fid.resize_to or 0),
                               "weights_sha256": np.array(p.weights_sha256 or "")})


def _merge(p: Prepared, name: str, markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Merge the set's partials in unit order: float64 sums, logits and cosines concatenated."""
    job = p.sets[name]
    sums = GaussianSums.empty(FID_DIM)
    logits, cos = [], []
    for part in partials.load_in_order(p.spec.output.path, name, range(len(job.images.units)), p.spec.storage):
        if job.fid:
            sums.merge_unit(part)
        if job.isc:
            logits.append(part["logits"])
        if job.clip:
            cos.append(part["cos"])
    return {
        "n": sum(int(m["count"]) for m in markers.values()),
        "fid": sums if job.fid else None,
        "logits": np.concatenate(logits) if job.isc else None,
        "cos": np.concatenate(cos) if job.clip else None,
        "truncated": sum(int(m.get("truncated_captions", 0)) for m in markers.values()),
    }


def _score(p: Prepared, todo: list[tuple[str, int]], markers: dict[str, dict[int, dict[str, Any]]],
           resources: dict[str, float]) -> Any:
    import ray

    from synthmill.cluster.connect import actor_count, actor_options
    from synthmill.cluster.pool import ProgressBar, ShardPool
    from synthmill.cluster.scorer import ScorerActor

    spec = p.spec
    n_actors, use_gpu = actor_count(spec.cluster.num_actors, resources, spec.cluster.cpus_per_actor)
    n_actors = min(n_actors, len(todo))
    work = ray.put(Work(p.sets, todo, p.fingerprint, spec.fid.weights, p.weights_sha256, spec.output.path,
                        spec.storage))
    options = actor_options(spec.cluster, use_gpu)

    def make_actor():
        return ScorerActor.options(**options).remote(spec, work)

    def on_result(t: int, marker: dict[str, Any]) -> None:
        if "bad_input" in marker:
            raise SpecError(marker["bad_input"])
        set_name, k = todo[t]
        markers[set_name][k] = marker
        bar.committed(marker["count"])

    total = sum(p.sets[s].images.units[k].count or 0 for s, k in todo)
    pool = ShardPool(make_actor, n_actors, method="process", inflight=spec.cluster.inflight_per_actor,
                     max_attempts=spec.cluster.max_attempts, start_timeout_s=spec.cluster.start_timeout_s)
    bar = ProgressBar(total, "evaluate")
    try:
        report = pool.run(list(range(len(todo))), on_result, bar.update)
    finally:
        bar.close()
    if report.failed:
        failures = {f"{todo[t][0]}/{todo[t][1]:06d}": err for t, err in sorted(report.failed.items())}
        storage.write_json(storage.join(spec.output.path, "failures.json"), {"failed_units": failures}, spec.storage)
        names = ", ".join(list(failures)[:10]) + (" ..." if len(failures) > 10 else "")
        raise JobFailed(f"{len(failures)} units failed ({names}); first error: {next(iter(failures.values()))}. "
                        "Run the same command again to retry them; scored units are kept.")
    return report


def run(p: Prepared) -> dict[str, Any]:
    """Score what is not scored yet, merge, and write the stats files and ``metrics.json``."""
    from synthmill.cluster.connect import check_actor_fits, connect
    from synthmill.metrics.inception import IS_CONVENTION, PROTOCOLS, RESIZE_TO, inception_score

    spec, out, opts = p.spec, p.spec.output.path, p.spec.storage
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    markers = {name: partials.done(out, name, _identities(job), p.fingerprint, opts) for name, job in p.sets.items()}
    todo = [(name, u.index) for name, job in p.sets.items() for u in job.images.units if u.index not in markers[name]]
    # Ray first: a cluster address that does not answer is bad input, and nothing is written for it.
    resources = connect(spec.cluster.address) if todo else None
    if resources is not None:
        check_actor_fits(spec.cluster, resources)
    storage.write_json(storage.join(out, "plan.json"), {  # first: it makes the folder this job's
        "kind": "evaluate", "fingerprint": p.fingerprint,
        "sets": {n: {"path": storage.redact_url(j.images.path), "units": len(j.images.units), "samples": j.images.num_samples}
                 for n, j in p.sets.items()}}, opts)
    write_job_yaml(spec)
    resumed = sum(len(m) for m in markers.values())
    log.info("%d units to score, %d already scored", len(todo), resumed)
    report = None
    if todo:
        storage.remove(storage.join(out, "metrics.json"), opts)
        report = _score(p, todo, markers, resources)
    storage.remove(storage.join(out, "failures.json"), opts)

    gen = _merge(p, "generated", markers["generated"])
    metrics: dict[str, Any] = {}
    samples = {"generated": gen["n"]}
    _check_counts(spec, gen["n"])
    if gen["fid"] is not None:
        mu, sigma = gen["fid"].mean_cov()
        storage.write_bytes(storage.join(out, "fid_stats.npz"), _stats_file(mu, sigma, gen["n"], p), opts)
        if "fid" in spec.metrics:
            if p.reference_stats is not None:
                ref_mu, ref_sigma, ref_desc = p.reference_stats.mu, p.reference_stats.sigma, {
                    "kind": "stats", "path": storage.redact_url(p.reference_stats.path), **p.reference_stats.meta}
            else:
                ref = _merge(p, "reference", markers["reference"])
                samples["reference"] = ref["n"]
                _check_counts(spec, gen["n"], ref["n"])
                ref_mu, ref_sigma = ref["fid"].mean_cov()
                storage.write_bytes(storage.join(out, "reference_stats.npz"), _stats_file(ref_mu, ref_sigma, ref["n"], p), opts)
                ref_desc = {"kind": p.sets["reference"].images.kind, "path": storage.redact_url(spec.reference.path),
                            "stats_written": storage.redact_url(storage.join(out, "reference_stats.npz"))}
            metrics["fid"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
            metrics["fid_reference"] = ref_desc
            if min(samples.values()) <= FID_DIM:
                metrics["fid_warning"] = (f"fewer samples than the {FID_DIM} feature dimensions: the covariance is "
                                          "singular and FID is biased upwards; compare only at equal sample counts")
    if gen["logits"] is not None:
        isc = spec.inception_score
        mean, std = inception_score(gen["logits"], isc.splits, isc.seed, isc.shuffle)
        metrics["inception_score"] = {"mean": mean, "std": std, "splits": isc.splits, "seed": isc.seed,
                                      "shuffle": isc.shuffle}
    if gen["cos"] is not None:
        from synthmill.metrics.clipscore import clip_scores

        metrics.update(clip_scores(gen["cos"]))
        metrics["clip_truncated_captions"] = gen["truncated"]
    elapsed = time.perf_counter() - t0
    scored = sum(p.sets[s].images.units[k].count or 0 for s, k in todo)
    result = {
        "status": "complete",
        "kind": "evaluate",
        "metrics": metrics,
        "samples": samples,
        "protocol": {
            "fid": spec.fid.protocol, "fid_preprocessing": PROTOCOLS[spec.fid.protocol],
            "resize_to": spec.fid.resize_to, "resize_to_method": RESIZE_TO if spec.fid.resize_to else None,
            "inception_score": IS_CONVENTION if "is" in spec.metrics else None,
            "clip": ({"model": spec.clip.model, "pretrained": spec.clip.pretrained,
                      "clip_score": "mean cosine of image and caption embeddings",
                      "clip_score_x100": "mean of 100 * max(cosine, 0) (torchmetrics, MLPerf)"}
                     if "clip" in spec.metrics else None),
            "statistics": "per unit its float32 features (float64 sums from 4,096 samples), added to float64 sums "
                          "in unit order; covariance with divisor n-1",
            "tf32": False,
        },
        "weights": ({"file": spec.fid.weights or "standard (pytorch-fid's URL)", "sha256": p.weights_sha256,
                     "standard": bool(p.weights_sha256 and p.weights_sha256.startswith("6726825d"))}
                    if p.weights_sha256 else None),
        "units": {n: len(j.images.units) for n, j in p.sets.items()},
        "units_resumed": resumed,
        "units_run": len(todo),
        "samples_scored": scored,
        "elapsed_s": round(elapsed, 3),
        "devices": sorted({i["device"] for i in report.actor_infos}) if report else [],
        "actors_lost": report.actors_lost if report else 0,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(("synthmill", "torch", "torchvision", "numpy", "scipy", "pillow", "pytorch-fid",
                              "torch-fidelity", "open_clip_torch", "ray")),
    }
    storage.remove_stale_temporaries(out, started.timestamp())  # what runs killed while writing left
    storage.write_json(storage.join(out, "metrics.json"), result, opts)
    return result

