"""Feature extraction for FID / IS: synthmill's scorer vs pytorch-fid's own loop, images/s, same run.

``--images`` PNG files of ``--size`` x ``--size`` pixels (seeded smooth noise) are written to a temp
folder, and a seeded random Inception weights file with the real file's layout (the real one cannot be
downloaded here; speed does not depend on the values). Then, on the same images, weights and thread
count:

(a) pytorch-fid: ``fid_score.get_activations`` over the files (its DataLoader, batch ``--batch``),
    the network loaded through torch.hub's cache as pytorch-fid does, decoding on as many DataLoader workers
    as synthmill's scorer has decode threads (``cluster.decode_threads``, 4 by default): the fair baseline,
    which every ratio divides by;
(a0) the same with ``get_activations``' own default of one DataLoader worker, printed beside it (what a
    user who calls it without ``num_workers`` gets);
(b) synthmill's :class:`~synthmill.cluster.scorer.Scorer` (no Ray) scoring the folder as units of
    ``--unit`` files: FID features only, the same work as (a), plus committing the float64 sums;
(c) the same with FID features and IS logits (torch-fidelity's network: a second forward pass);
(d) ``synthmill run`` of an evaluate job with ``metrics: [fid_stats]`` end to end (Ray start, actor
    start, scoring, merge), one actor.

Printed: images/s of each and the ratios (b)/(a), (c)/(a), (d)/(a), and how far the statistics of
(b) are from (a)'s. (a), (b) and (c) first run one batch / unit untimed, so that one-off start-up
(kernel selection, allocations) counts for neither; (d) includes everything. On a CPU the benchmark
reruns itself under synthmill's CPU actor malloc settings, so that (a) gets the allocator (d)'s actor gets.
On a GPU the same command measures the GPU (``device`` in the output).

    python -m benchmarks.extract            # the numbers in RESULTS.md
    python -m benchmarks.extract --smoke    # a few images, without (d); what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

SMOKE = {"images": 8, "size": 64, "batch": 4, "unit": 4}


def make_images(folder: str, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` seeded smooth-noise RGB PNGs (upsampled 8x8 noise plus fine noise), sorted names."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        x = np.clip(np.asarray(coarse, np.int16) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:010d}.png")
        Image.fromarray(x).save(path)
        paths.append(path)
    return paths


def _pytorch_fid(files: list[str], weights: str, batch: int, workdir: str,
                 workers: int) -> tuple[float, np.ndarray, np.ndarray]:
    import torch
    from pytorch_fid import fid_score
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    hub = os.path.join(workdir, "torch", "hub", "checkpoints")
    os.makedirs(hub, exist_ok=True)
    shutil.copy(weights, os.path.join(hub, os.path.basename(FID_WEIGHTS_URL)))
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = os.path.join(workdir, "torch")
    try:
        model = InceptionV3([3]).eval()
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = old
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    fid_score.get_activations(files[:batch], model, batch_size=batch, device=device, num_workers=workers)  # warm-up
    t = time.perf_counter()
    act = fid_score.get_activations(files, model, batch_size=batch, device=device, num_workers=workers)
    secs = time.perf_counter() - t
    return secs, act.mean(axis=0), np.cov(act, rowvar=False)


def _scorer(folder: str, weights: str, batch: int, unit: int, isc: bool, out: str) -> tuple[float, Any]:
    import torch

    from synthmill.cluster.scorer import Scorer, SetJob, Work
    from synthmill.jobs.evaluate_spec import EvaluateSpec
    from synthmill.metrics import partials
    from synthmill.metrics.frechet import GaussianSums
    from synthmill.sharding.images import open_image_set

    spec = EvaluateSpec()
    spec.cluster.batch_size, spec.cluster.cpus_per_actor = batch, torch.get_num_threads()
    images = open_image_set(folder, None, unit)
    features = ("pool3", "logits") if isc else ("pool3",)
    work = Work({"generated": SetJob(images, features)}, [("generated", u.index) for u in images.units],
                "bench", {"inception": {"weights": weights, "sha256": None}}, out)
    scorer = Scorer(spec, work)
    scorer.process(0)  # warm-up, as for (a); committed again below
    t = time.perf_counter()
    for task in range(len(work.tasks)):
        scorer.process(task)
    secs = time.perf_counter() - t
    sums = GaussianSums.empty(2048)
    for u in images.units:
        p = partials.load(out, "generated", u.index)
        sums.merge_unit(p)
    return secs, (sums, scorer.device)


def _end_to_end(folder: str, weights: str, batch: int, unit: int, threads: int, out: str) -> float:
    import yaml

    spec = {"kind": "evaluate", "generated": {"path": folder, "samples_per_unit": unit}, "metrics": ["fid_stats"],
            "fid": {"weights": weights}, "output": {"path": out},
            "cluster": {"num_actors": 1, "batch_size": batch, "cpus_per_actor": threads}}
    path = out + ".yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh)
    env = dict(os.environ, RAY_ADDRESS="")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "synthmill.cli", "run", path], capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"synthmill run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return secs


def run(images: int, size: int, batch: int, unit: int, end_to_end: bool = True) -> dict[str, Any]:
    import torch

    from synthmill.jobs.evaluate_spec import EvaluateSpec
    from synthmill.testing.random_weights import save_random_inception

    work = tempfile.mkdtemp(prefix="synthmill-bench-extract-")
    try:
        folder = os.path.join(work, "images")
        files = make_images(folder, images, size)
        weights = save_random_inception(os.path.join(work, "inception.pth"), seed=0)
        threads = torch.get_num_threads()
        decode = EvaluateSpec().cluster.decode_threads  # what (b), (c) and (d) decode on
        a, mu, sigma = _pytorch_fid(files, weights, batch, work, decode)
        a0, _, _ = _pytorch_fid(files, weights, batch, work, 1)
        b, (sums, device) = _scorer(folder, weights, batch, unit, False, os.path.join(work, "b"))
        c, _ = _scorer(folder, weights, batch, unit, True, os.path.join(work, "c"))
        seconds = {"a": a, "a0": a0, "b": b, "c": c}
        if end_to_end:
            seconds["d"] = _end_to_end(folder, weights, batch, unit, threads, os.path.join(work, "d"))
        mu_b, sigma_b = sums.mean_cov()
        return {
            "images": images, "size": size, "batch": batch, "unit": unit, "threads": threads, "device": device,
            "decode_workers": decode,
            "seconds": seconds,
            "images_per_s": {k: images / v for k, v in seconds.items()},
            "ratios": {f"{k}/a": a / v for k, v in seconds.items() if k not in ("a", "a0")},
            "stats_max_rel_diff": float(max(np.abs(mu_b - mu).max() / np.abs(mu).max(),
                                            np.abs(sigma_b - sigma).max() / np.abs(sigma).max())),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict[str, Any]) -> str:
    workers = r.get("decode_workers", 0)
    names = {"a": f"pytorch-fid get_activations (FID features), {workers} DataLoader workers",
             "a0": "the same with its default of 1 DataLoader worker",
             "b": f"synthmill Scorer, FID features, {workers} decode threads",
             "c": "synthmill Scorer, FID features + IS logits", "d": "synthmill run (evaluate job, 1 actor)"}
    lines = [f"{r['images']} PNG images of {r['size']}x{r['size']}, batch {r['batch']}, units of {r['unit']}, "
             f"{r['threads']} torch threads, device {r['device']}", "",
             "| run | seconds | images/s |", "| --- | ---: | ---: |"]
    for k, name in names.items():
        if k not in r["seconds"]:
            lines.append(f"| ({k}) {name} | not run (--smoke) | |")
            continue
        lines.append(f"| ({k}) {name} | {r['seconds'][k]:.2f} | {r['images_per_s'][k]:.2f} |")
    rt = r["ratios"]
    ratios = ", ".join(f"({k.split('/')[0]})/(a) = {v:.3f}" for k, v in rt.items())
    lines += ["", f"ratios: {ratios}; statistics (b) vs (a): max relative difference {r['stats_max_rel_diff']:.2e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extract", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--unit", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="a few tiny images: checks the code runs")
    args = p.parse_args(argv)
    if args.smoke:  # the end-to-end run (d) is left out: the evaluate tests run `synthmill run` already
        args = SimpleNamespace(**SMOKE, smoke=True)
    from benchmarks.child import rerun_under_cpu_malloc

    code = rerun_under_cpu_malloc("benchmarks.extract", argv if argv is not None else sys.argv[1:])
    if code is not None:  # on a CPU: the baselines, run in this process, get the actors' allocator settings
        return code
    print(render(run(args.images, args.size, args.batch, args.unit, end_to_end=not args.smoke)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
