"""FID (``fid``) and the generated set's FID statistics alone (``fid_stats``), from Inception pool3 features.

Each unit keeps its features (or, from 4,096 images, their float64 sums: :class:`UnitFeatures`); the driver
adds them in unit order into float64 sums, takes mean and covariance (divisor n-1) and writes them as
pytorch-fid writes statistics (``fid_stats.npz``, and ``reference_stats.npz`` for a reference of images),
plus how they were made. A reference may be such a statistics file instead of images; one that synthmill
wrote says its protocol, and FID across protocols is refused.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthmill.errors import SpecError
from synthmill.metrics.base import Feature, Finish, Metric, need
from synthmill.metrics.frechet import GaussianSums, UnitFeatures, frechet_distance
from synthmill.sharding import storage
from synthmill.sharding.layout import FID_STATS, REFERENCE_STATS

FID_DIM = 2048


class Pool3Unit(UnitFeatures):
    """A unit's pool3 features (rows, or float64 sums once they are smaller)."""

    def __init__(self) -> None:
        super().__init__(FID_DIM)

    def marker(self) -> dict[str, Any]:
        return {}


class Pool3Total:
    """A set's pool3 features as float64 sums, each unit's added in unit order."""

    def __init__(self) -> None:
        self.sums = GaussianSums.empty(FID_DIM)

    def add(self, arrays: Mapping[str, np.ndarray], marker: Mapping[str, Any]) -> None:
        self.sums.merge_unit(arrays)


POOL3 = Feature("pool3", "inception", Pool3Unit, Pool3Total)


@dataclass
class ReferenceStats:
    """A reference given as statistics: mu, sigma and whatever synthmill recorded beside them."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any]


def read_reference(path: str, opts: dict[str, Any] | None) -> bytes:
    """The bytes of the statistics file ``reference.path``; SpecError naming it when it cannot be read."""
    try:
        return storage.read_bytes(path, opts)
    except FileNotFoundError:
        raise SpecError(f"reference.path {path}: file not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"reference.path {path}: cannot read it ({e.strerror})") from None


def load_stats(path: str, opts: dict[str, Any] | None, spec: Any, info: dict[str, dict[str, Any]]) -> ReferenceStats:
    """The statistics file ``reference.path``, checked: its arrays, and that it was made as this job's are."""
    data = read_reference(path, opts)
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
    if odd:  # what _check_meta compares: an array there would skip the check
        raise SpecError(f"reference.path {path}: '{odd[0]}' is an array of shape {arrays[odd[0]].shape}, not the "
                        "single value that says how the statistics were made")
    ref = ReferenceStats(path, mu, sigma, meta)
    _check_meta(ref, spec, info.get("inception", {}).get("sha256"))
    return ref


def _check_meta(ref: ReferenceStats, spec: Any, sha: str | None) -> None:
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


def stats_file(mu: np.ndarray | None, sigma: np.ndarray | None, n: int, spec: Any, weights_sha256: str | None,
               extra: Mapping[str, np.ndarray] | None = None) -> bytes:
    """mu and sigma as pytorch-fid writes them, plus how they were made (pytorch-fid ignores the rest), plus
    ``extra`` arrays (other metrics' per-image features, which can stand in for the images as a reference)."""
    from synthmill.metrics.partials import npz_bytes

    arrays = {"mu": mu, "sigma": sigma} if mu is not None else {}
    return npz_bytes({**arrays, "n": np.array(n), "protocol": np.array(spec.fid.protocol),
                      "resize_to": np.array(spec.fid.resize_to or 0), "weights_sha256": np.array(weights_sha256 or ""),
                      **(extra or {})})


#: The statistics file written for each set (the reference's only when it is images).
STATS_FILES = {"generated": FID_STATS, "reference": REFERENCE_STATS}


def write_set_stats(f: Finish, set_name: str) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Write the set's statistics file once, whichever metric asks first; return its URL, mu and sigma.

    It holds mu and sigma when FID's features were computed, and the arrays of every merged feature total
    that offers ``stats_arrays(spec)`` (KID's and CMMD's per-image features), so it can be a later job's
    reference for each of those metrics.
    """
    key = f"{set_name}_stats"
    if key not in f.done:
        totals = f.totals[set_name]
        mu = sigma = None
        if "pool3" in totals:
            mu, sigma = totals["pool3"].sums.mean_cov()
        extra: dict[str, np.ndarray] = {}
        for total in totals.values():
            if hasattr(total, "stats_arrays"):
                extra.update(total.stats_arrays(f.spec))
        sha = f.info.get("inception", {}).get("sha256")
        url = f.write(STATS_FILES[set_name], stats_file(mu, sigma, f.samples[set_name], f.spec, sha, extra))
        f.done[key] = url, mu, sigma
    return f.done[key]


def _generated_stats(f: Finish) -> tuple[np.ndarray, np.ndarray]:
    """The generated set's mean and covariance, written to ``fid_stats.npz`` once whichever metric asks first."""
    _, mu, sigma = write_set_stats(f, "generated")
    return mu, sigma


def _check(spec: Any, samples: Mapping[str, int | None]) -> None:
    need("fid", "generated", samples.get("generated"), 2, "a covariance needs two")
    need("fid", "reference", samples.get("reference"), 2, "a covariance needs two")


def _finish_stats(f: Finish) -> dict[str, Any]:
    _generated_stats(f)
    return {}


def _finish_fid(f: Finish) -> dict[str, Any]:
    mu, sigma = _generated_stats(f)
    spec = f.spec
    if f.reference is not None:
        ref_mu, ref_sigma = f.reference.mu, f.reference.sigma
        ref_desc = {"kind": "stats", "path": storage.redact_url(f.reference.path), **f.reference.meta}
    else:
        written, ref_mu, ref_sigma = write_set_stats(f, "reference")
        ref_desc = {"kind": f.reference_kind, "path": storage.redact_url(spec.reference.path),
                    "stats_written": storage.redact_url(written)}
    out: dict[str, Any] = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "fid_reference": ref_desc}
    if min(f.samples.values()) <= FID_DIM:
        out["fid_warning"] = (f"fewer samples than the {FID_DIM} feature dimensions: the covariance is "
                              "singular and FID is biased upwards; compare only at equal sample counts")
    return out


FID = Metric(
    "fid", {"generated": ("pool3",), "reference": ("pool3",)}, _check, _finish_fid,
    reference_hint=("fid needs a reference (a folder or tars of real images, or a stats .npz); "
                    "to only write fid_stats.npz of the generated set, use metrics: [fid_stats]"),
    reference_stats=load_stats,
    libraries=("pytorch-fid", "scipy"),
)
FID_STATS_ONLY = Metric("fid_stats", {"generated": ("pool3",)}, _check, _finish_stats, libraries=("pytorch-fid",))
