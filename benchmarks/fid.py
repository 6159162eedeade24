"""Frechet distance (FID's last step): synthmill's Cholesky + eigenvalues vs pytorch-fid's ``sqrtm``.

Two float64 Gaussians stand in for the Inception statistics of a generated set and of COCO 2014 val:
``--n1`` and ``--n2`` samples (30,000 and 40,504 by default) of ``--dim`` (2048) non-negative features,
``relu(z @ W + noise * scale + bias)`` with a rank-``dim/8`` standard normal ``z``, per-dimension
noise scales and a bias (like average-pooled ReLU activations); the second set has a perturbed ``W``,
scale and bias. Everything is drawn from one fixed numpy seed, in chunks of 4,096 rows, and each set's
mean and covariance come from synthmill's ``GaussianSums`` (the sums the FID job merges), checked
against ``np.mean``/``np.cov`` on the first chunk of the first set.

Then ``pytorch_fid.fid_score.calculate_frechet_distance`` and ``synthmill.metrics.frechet.frechet_distance``
get the same four arrays, ``--repeats`` times each, interleaved so that drifts in machine speed hit both;
the best time of each counts. Goals: pytorch-fid time / synthmill time >= 5, and
|synthmill - pytorch-fid| / |pytorch-fid| <= 1e-6.

Then the merge of an evaluate job's partials, the other half of FID's final step: ``--units`` units of
``--unit-rows`` feature rows each (30 x 1,000 by default: MS-COCO 30K in generate's default shards),
committed as npz files to a temporary folder in both forms a unit can take (its float32 rows, what
units of fewer than 4,096 commit, or its float64 sums), then read back and merged in unit order as the
driver does. Reported: bytes a unit, the scorer's time to turn a unit into its partial, the driver's
time to read and merge all of them, and the two forms' merged statistics against each other. Then the
rows form again from ``s3://`` (moto on 127.0.0.1 behind ``benchmarks/slowlink.py``: ``--s3-rate`` MB/s and
``--s3-latency`` a response per connection, like one S3 GET stream), read one unit at a time against the
driver's four reads in flight.

    python -m benchmarks.fid             # the CPU numbers of RESULTS.md
    python -m benchmarks.fid --smoke     # 64-d, seconds; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

SPEEDUP_GOAL = 5.0  # pytorch-fid seconds / synthmill seconds
REL_DIFF_GOAL = 1e-6  # |synthmill - pytorch-fid| / |pytorch-fid|
COV_CHECK_GOAL = 1e-9  # GaussianSums vs np.cov, relative Frobenius norm
CHUNK = 4096  # rows drawn and added to the sums at a time
SMOKE = {"dim": 64, "n1": 3000, "n2": 4050, "repeats": 3}
SMOKE_MERGE = {"units": 4, "unit_rows": 50}


def feature_models(dim: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Two related but different ways of mixing standard normals into ``dim`` features."""
    rank = max(dim // 8, 1)
    w = rng.standard_normal((rank, dim)) / np.sqrt(rank)
    scale = rng.uniform(0.3, 1.0, dim)
    bias = rng.normal(0.1, 0.3, dim)
    first = {"w": w, "scale": scale, "bias": bias}
    second = {
        "w": w + 0.35 * rng.standard_normal((rank, dim)) / np.sqrt(rank),
        "scale": scale * rng.uniform(0.8, 1.25, dim),
        "bias": bias + rng.normal(0.0, 0.1, dim),
    }
    return [first, second]


def draw(model: dict[str, np.ndarray], rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` float64 feature vectors of one model: ``relu(z @ W + noise * scale + bias)``."""
    w, scale, bias = model["w"], model["scale"], model["bias"]
    x = rng.standard_normal((rows, w.shape[0])) @ w
    x += rng.standard_normal((rows, w.shape[1])) * scale
    x += bias
    return np.maximum(x, 0.0, out=x)


def gaussian(model: dict[str, np.ndarray], n: int, rng: np.random.Generator,
             check: bool = False) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Mean and covariance of ``n`` samples, accumulated chunk by chunk in ``GaussianSums``.

    With ``check``, the first chunk is also added to a sums object of its own in three uneven pieces,
    and that mean and covariance are compared with ``np.mean``/``np.cov`` of the chunk; the largest of
    the two relative errors (Frobenius norm of the difference over that of numpy's) is returned.
    """
    from synthmill.metrics.frechet import GaussianSums

    dim = model["w"].shape[1]
    sums, err = GaussianSums.empty(dim), None
    for lo in range(0, n, CHUNK):
        x = draw(model, min(CHUNK, n - lo), rng)
        if check and lo == 0:
            part = GaussianSums.empty(dim)
            cuts = [0, len(x) // 5, len(x) // 2, len(x)]
            for a, b in zip(cuts, cuts[1:], strict=False):
                part.add(x[a:b])
            mu, cov = part.mean_cov()
            np_mu, np_cov = x.mean(axis=0), np.cov(x, rowvar=False)
            err = max(float(np.linalg.norm(mu - np_mu) / np.linalg.norm(np_mu)),
                      float(np.linalg.norm(cov - np_cov) / np.linalg.norm(np_cov)))
        sums.add(x)
    mu, cov = sums.mean_cov()
    return mu, cov, err


def pytorch_fid_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's ``calculate_frechet_distance``, as it is (scipy's ``disp`` deprecation silenced)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def run(dim: int = 2048, n1: int = 30000, n2: int = 40504, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Build the two Gaussians, time both implementations on them; return what was measured."""
    from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: F401  (import outside the timing)

    from synthmill.metrics.frechet import frechet_distance

    rng = np.random.default_rng(seed)
    models = feature_models(dim, rng)
    t0 = time.perf_counter()
    mu1, sigma1, cov_err = gaussian(models[0], n1, rng, check=True)
    mu2, sigma2, _ = gaussian(models[1], n2, rng)
    stats_s = time.perf_counter() - t0
    print(f"{dim}-d Gaussians of {n1} and {n2} samples (seed {seed}) built with GaussianSums in "
          f"{stats_s:.2f} s; GaussianSums vs np.cov on {min(CHUNK, n1)} samples: relative error {cov_err:.2e}; "
          f"tr(sigma1) {np.trace(sigma1):.4f}, tr(sigma2) {np.trace(sigma2):.4f}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    ref_s, ours_s = [], []
    ref = ours = float("nan")
    for r in range(repeats):  # interleaved, so drifts in machine speed hit both alike
        t0 = time.perf_counter()
        ref = pytorch_fid_distance(mu1, sigma1, mu2, sigma2)
        ref_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = frechet_distance(mu1, sigma1, mu2, sigma2)
        ours_s.append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{repeats}: pytorch-fid {ref_s[-1]:.3f} s ({ref!r}), "
              f"synthmill {ours_s[-1]:.3f} s ({ours!r})", flush=True)

    load = os.getloadavg()[0]
    print(f"load average after the timed calls {load:.2f}", flush=True)
    speedup = min(ref_s) / min(ours_s)
    rel_diff = abs(ours - ref) / abs(ref)
    return {
        "dim": dim, "n1": n1, "n2": n2, "repeats": repeats, "seed": seed,
        "stats_s": stats_s,
        "cov_check_rel_err": cov_err,
        "pytorch_fid_s": min(ref_s), "synthmill_s": min(ours_s),
        "pytorch_fid_all_s": ref_s, "synthmill_all_s": ours_s,
        "speedup": speedup,
        "pytorch_fid_value": ref, "synthmill_value": ours,
        "abs_diff": abs(ours - ref), "rel_diff": rel_diff,
        "cpus": os.cpu_count(), "load_average": load,
        "cov_check_met": cov_err <= COV_CHECK_GOAL,
        "speedup_met": speedup >= SPEEDUP_GOAL,
        "rel_diff_met": rel_diff <= REL_DIFF_GOAL,
    }


def _merge_all(output: str, units: int, dim: int, options: dict[str, Any] | None, depth: int) -> tuple[float, Any]:
    """The driver's merge of ``units`` partials of set ``generated``: (seconds, the float64 sums)."""
    from synthmill.metrics import partials
    from synthmill.metrics.frechet import GaussianSums

    t0 = time.perf_counter()
    total = GaussianSums.empty(dim)
    for part in partials.load_in_order(output, "generated", range(units), options, depth=depth):
        total.merge_unit(part)
    return time.perf_counter() - t0, total


def merge_run(dim: int = 2048, units: int = 30, unit_rows: int = 1000, seed: int = 0, s3_rate: float = 0.0,
              s3_latency: float = 0.03, repeats: int = 2) -> dict[str, Any]:
    """Write ``units`` partials of ``unit_rows`` rows in each form, read them back and merge as the driver
    does; time both. With ``s3_rate`` (MB/s a connection), the rows form also from ``s3://`` through a
    link of that rate and ``s3_latency``: one read at a time against the driver's 4 in flight."""
    import tempfile

    from synthmill.metrics import partials
    from synthmill.metrics.frechet import GaussianSums, UnitFeatures

    rng = np.random.default_rng(seed)
    model = feature_models(dim, rng)[0]
    forms = {"rows": {"bytes": 0, "commit_s": 0.0}, "sums": {"bytes": 0, "commit_s": 0.0}}
    result: dict[str, Any] = {"units": units, "unit_rows": unit_rows, "dim": dim, "forms": forms}
    with tempfile.TemporaryDirectory(prefix="fid-merge-") as tmp:
        for k in range(units):
            x = draw(model, unit_rows, rng).astype(np.float32)  # Inception's pool3 features are float32
            for form in forms:
                t0 = time.perf_counter()
                if form == "rows":
                    arrays = {"features": x}
                else:
                    sums = GaussianSums.empty(dim)
                    sums.add(x)
                    arrays = {"sum": sums.total, "outer": sums.outer}
                data = partials.npz_bytes(dict(arrays, n=np.array(unit_rows)))
                forms[form]["commit_s"] += time.perf_counter() - t0
                forms[form]["bytes"] += len(data)
                path = partials.npz_url(os.path.join(tmp, form), "generated", k)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(data)
        if unit_rows < 2 * dim:  # what a scorer commits for a unit of this size
            check = UnitFeatures(dim)
            check.add(x)
            assert "features" in check.arrays()
        merged = {}
        for form in forms:
            forms[form]["merge_s"], total = _merge_all(os.path.join(tmp, form), units, dim, None, 4)
            merged[form] = total.mean_cov()
        if s3_rate:
            result["s3"] = _merge_s3(os.path.join(tmp, "rows"), units, dim, s3_rate, s3_latency, repeats,
                                     merged["rows"])
    diff = max(float(np.abs(a - b).max() / np.abs(b).max())
               for a, b in zip(merged["rows"], merged["sums"], strict=True))
    print(f"merge: {units} units of {unit_rows} {dim}-d rows; rows form {forms['rows']['bytes'] / units / 2**20:.2f} "
          f"MiB a unit, merged in {forms['rows']['merge_s']:.2f} s; sums form "
          f"{forms['sums']['bytes'] / units / 2**20:.2f} MiB a unit, formed in {forms['sums']['commit_s']:.2f} s, "
          f"merged in {forms['sums']['merge_s']:.2f} s; largest relative difference {diff:.1e}", flush=True)
    return dict(result, merged_rel_diff=diff, bytes_ratio=forms["sums"]["bytes"] / forms["rows"]["bytes"])


def _merge_s3(folder: str, units: int, dim: int, rate: float, latency: float, repeats: int,
              want: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """The rows-form partials of ``folder`` from s3:// behind a SlowLink: one read at a time vs 4 in flight."""
    from benchmarks.slowlink import SlowLink
    from benchmarks.startup import s3_model

    with s3_model(folder) as (url, options):
        host, port = options["endpoint_url"].rsplit("/", 1)[1].split(":")
        link = SlowLink((host, int(port)), rate * 1e6, latency)
        options = dict(options, endpoint_url=link.url)
        times: dict[int, list[float]] = {1: [], 4: []}
        try:
            for _ in range(repeats):  # interleaved, so drifts in machine speed hit both alike
                for depth in times:
                    secs, total = _merge_all(url, units, dim, options, depth)
                    times[depth].append(secs)
                    assert all(np.array_equal(a, b)
                               for a, b in zip(total.mean_cov(), want, strict=True)), "s3 merge differs"
        finally:
            link.close()
    out = {"rate_mb_s": rate, "latency_s": latency, "one_at_a_time_s": min(times[1]), "in_flight_4_s": min(times[4]),
           "all_s": times}
    print(f"merge from s3:// (moto on 127.0.0.1, {rate:g} MB/s and {latency * 1000:g} ms a response per connection), "
          f"rows form, best of {repeats}: one read at a time {out['one_at_a_time_s']:.2f} s, "
          f"4 in flight (the driver) {out['in_flight_4_s']:.2f} s; merged statistics equal to the local merge's",
          flush=True)
    return out


def render_merge(m: dict[str, Any]) -> str:
    """The merge table: bytes and seconds of both forms, the ratios sums / rows."""
    rows, sums = m["forms"]["rows"], m["forms"]["sums"]
    lines = [f"| partial form ({m['units']} units of {m['unit_rows']}) | MiB a unit | scorer: form the partial, s "
             "| driver: read + merge, s | scorer + driver, s |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, f in (("float32 feature rows (synthmill, units < 4,096)", rows), ("float64 sums (units >= 4,096)", sums)):
        lines.append(f"| {name} | {f['bytes'] / m['units'] / 2**20:.2f} | {f['commit_s']:.3f} | {f['merge_s']:.3f} "
                     f"| {f['commit_s'] + f['merge_s']:.3f} |")
    lines.append("")
    lines.append(f"ratio sums / rows: bytes {m['bytes_ratio']:.2f}, driver's merge "
                 f"{sums['merge_s'] / rows['merge_s']:.2f}, scorer + driver "
                 f"{(sums['commit_s'] + sums['merge_s']) / (rows['commit_s'] + rows['merge_s']):.2f}; "
                 f"merged statistics differ by {m['merged_rel_diff']:.1e} (relative)")
    if "s3" in m:
        s3 = m["s3"]
        lines.append(f"ratio from s3:// ({s3['rate_mb_s']:g} MB/s, {s3['latency_s'] * 1000:g} ms a response): "
                     "one read at a time / "
                     f"4 in flight = {s3['one_at_a_time_s'] / s3['in_flight_4_s']:.2f} "
                     f"({s3['one_at_a_time_s']:.2f} vs {s3['in_flight_4_s']:.2f} s)")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    """The markdown table and the verdict line."""
    timed = f"best of {result['repeats']}"
    lines = ["| implementation | timed | seconds | Frechet distance |", "| --- | --- | ---: | ---: |"]
    lines.append(f"| pytorch-fid 0.3.0 `calculate_frechet_distance` (scipy `sqrtm`) | {timed} | "
                 f"{result['pytorch_fid_s']:.4f} | {result['pytorch_fid_value']:.10f} |")
    lines.append(f"| synthmill `frechet_distance` (Cholesky + `eigvalsh`) | {timed} | "
                 f"{result['synthmill_s']:.4f} | {result['synthmill_value']:.10f} |")
    lines.append("")
    lines.append(f"ratio: pytorch-fid / synthmill = {result['speedup']:.2f} "
                 f"(goal >= {SPEEDUP_GOAL:g}: {'met' if result['speedup_met'] else 'NOT met'}); "
                 f"relative difference = {result['rel_diff']:.2e} "
                 f"(goal <= {REL_DIFF_GOAL:g}: {'met' if result['rel_diff_met'] else 'NOT met'})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fid", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=2048, help="feature dimensions (default 2048)")
    p.add_argument("--n1", type=int, default=30000, help="samples of the first Gaussian (default 30000)")
    p.add_argument("--n2", type=int, default=40504, help="samples of the second Gaussian (default 40504)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each implementation, best counts "
                   "(default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--units", type=int, default=30, help="partials merged (default 30)")
    p.add_argument("--unit-rows", type=int, default=1000, help="feature rows a partial (default 1000)")
    p.add_argument("--s3-rate", type=float, default=50.0, help="MB/s a connection of the s3:// merge (moto on "
                   "127.0.0.1 behind a throttling proxy; default 50, 0 skips it)")
    p.add_argument("--s3-latency", type=float, default=0.03, help="seconds before each response (default 0.03)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny fast run: {SMOKE['dim']}-d, {SMOKE['n1']} and {SMOKE['n2']} samples")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.smoke:
        args.dim, args.n1, args.n2, args.repeats = SMOKE["dim"], SMOKE["n1"], SMOKE["n2"], SMOKE["repeats"]
        args.units, args.unit_rows = SMOKE_MERGE["units"], SMOKE_MERGE["unit_rows"]
    for name in ("dim", "repeats", "units", "unit_rows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("n1", "n2"):
        if getattr(args, name) < 2:
            raise SystemExit(f"--{name} must be >= 2")
    result = run(args.dim, args.n1, args.n2, args.repeats, args.seed)
    merge = merge_run(args.dim, args.units, args.unit_rows, args.seed, args.s3_rate, args.s3_latency)
    print()
    print(render(result))
    print()
    print(render_merge(merge))
    return 0


if __name__ == "__main__":
    sys.exit(main())
