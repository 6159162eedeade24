"""Every metric in one evaluate pass vs the reference libraries run one after another, on the same images.

``--images`` generated PNGs of ``--size`` x ``--size`` pixels (seeded smooth noise) with real COCO captions,
and as many reference PNGs (another seed), are written to a temp folder. Each metric of synthmill's metrics
table that has a row in :data:`BASELINES` (and whose baseline says this machine can run it) is then computed
twice:

(a) the way users do it today: each metric's own library, one after another, each loading its network and
    reading the images itself (pytorch-fid's ``calculate_fid_given_paths`` for FID, torch-fidelity's
    ``calculate_metrics`` for IS, a direct open_clip loop for CLIP, and the rows other modules add);
(b) ``synthmill run`` of one evaluate job with all of those metrics, end to end (interpreter, local Ray,
    one actor, scoring, merge, ``metrics.json``), in a fresh interpreter.

Both sides get the same torch threads (``--threads``) and decode workers (``--workers``: the baselines'
DataLoader workers, synthmill's ``cluster.decode_threads``; torch-fidelity fixes its own at
``min(4, 2 x CPUs)``, the default here) and, on a CPU, the glibc malloc settings of synthmill's CPU actors (the
benchmark reruns itself in a child process with them). Printed: each baseline's seconds, images/s of (a) and
of (b) (generated images over wall seconds), the ratio (b)/(a), and each number of (b) against (a)'s with its
tolerance.

Networks have random weights saved in their real formats (nothing can be downloaded here; speed does not depend
on the values): the real Inception network, and a tiny CLIP unless ``--full-size`` (ViT-L-14, for a GPU).

A baseline is a :class:`Baseline` row keyed by the metric's name. Modules ``benchmarks/evaluate_baselines.py``
and ``benchmarks/preference_baselines.py``, when present, add theirs through their own ``BASELINES`` dict.

    python -m benchmarks evaluate-all                  # CPU defaults (the numbers in RESULTS.md)
    python -m benchmarks evaluate-all --full-size      # full-size CLIP (a GPU machine)
    python -m benchmarks evaluate-all --smoke          # a few tiny images; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.extract import make_images

REPO = Path(__file__).resolve().parent.parent
COCO = REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"
# FID is left out of the smoke: pytorch-fid's sqrtm of 2048 x 2048 alone takes minutes on a busy small machine, and
# tests/test_evaluate.py checks synthmill's FID against pytorch-fid's already
SMOKE = {"images": 10, "size": 32, "batch": 10, "threads": 1, "workers": 0, "full_size": False,
         "metrics": ["is", "clip"]}
#: Modules that add rows to BASELINES (a ``BASELINES`` dict of theirs), when they exist.
PLUG_INS = ("benchmarks.evaluate_baselines", "benchmarks.preference_baselines")


@dataclass
class Bench:
    """What every baseline gets: the two image folders (captions beside the generated images), their files in
    sorted order, the settings both sides share, and a work folder for files a baseline writes (weights)."""

    generated: str
    reference: str
    files: list[str]
    reference_files: list[str]
    captions: list[str]
    batch: int
    threads: int
    workers: int
    device: str
    full_size: bool
    work: str
    shared: dict[str, Any] = field(default_factory=dict)  # what one baseline made that another reuses

    def inception_weights(self) -> str:
        """The seeded random Inception file (pytorch-fid's layout), made once."""
        if "inception" not in self.shared:
            from synthmill.testing.random_weights import save_random_inception

            self.shared["inception"] = save_random_inception(os.path.join(self.work, "inception.pth"), seed=0)
        return self.shared["inception"]


@dataclass(frozen=True)
class Baseline:
    """One metric as the benchmark runs it. ``spec(bench)``: the evaluate spec's sections synthmill's job needs
    for it (writing any weights file under ``bench.work``); ``run(bench)``: the reference library on the same
    images, timed by the caller, returning ``{key: value}`` with keys as in metrics.json's ``metrics`` (a dot for
    a nested entry: ``inception_score.mean``); ``tolerance``: the relative difference allowed per key;
    ``unavailable(bench)``: why this machine cannot run it, or None."""

    spec: Callable[[Bench], dict[str, Any]]
    run: Callable[[Bench], dict[str, float]]
    tolerance: dict[str, float]
    library: str
    unavailable: Callable[[Bench], str | None] = lambda bench: None


# ---- FID: pytorch-fid ----

def _fid_spec(b: Bench) -> dict[str, Any]:
    return {"reference": {"path": b.reference}, "fid": {"weights": b.inception_weights()}}


def _fid_run(b: Bench) -> dict[str, float]:
    from pytorch_fid import fid_score
    from pytorch_fid.inception import FID_WEIGHTS_URL

    hub = os.path.join(b.work, "torch", "hub", "checkpoints")  # where torch.hub (and so pytorch-fid) looks first
    os.makedirs(hub, exist_ok=True)
    shutil.copy(b.inception_weights(), os.path.join(hub, os.path.basename(FID_WEIGHTS_URL)))
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = os.path.join(b.work, "torch")
    try:
        fid = fid_score.calculate_fid_given_paths([b.generated, b.reference], b.batch, b.device, 2048, b.workers)
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = old
    return {"fid": float(fid)}


# ---- IS: torch-fidelity ----

def _splits(b: Bench) -> int:
    """torch-fidelity's 10 splits, or fewer for a set of fewer than 20 images (two images a split at least)."""
    return max(1, min(10, len(b.files) // 2))


def _is_spec(b: Bench) -> dict[str, Any]:
    return {"fid": {"weights": b.inception_weights()}, "inception_score": {"splits": _splits(b)}}


def _is_run(b: Bench) -> dict[str, float]:
    import torch_fidelity

    r = torch_fidelity.calculate_metrics(input1=b.generated, isc=True, isc_splits=_splits(b), cuda=b.device == "cuda",
                                         batch_size=b.batch, cache=False, verbose=False, samples_find_ext="png",
                                         feature_extractor_weights_path=b.inception_weights())
    return {"inception_score.mean": r["inception_score_mean"], "inception_score.std": r["inception_score_std"]}


# ---- CLIP: open_clip called directly ----

def _clip_model(b: Bench) -> tuple[str, str | None]:
    """(model, pretrained) of the CLIP both sides load: a tiny local-dir model, or ViT-L-14 from a checkpoint."""
    if "clip" not in b.shared:
        if b.full_size:
            import open_clip
            import torch

            torch.manual_seed(0)
            path = os.path.join(b.work, "vit-l-14.pt")
            torch.save(open_clip.create_model("ViT-L-14").state_dict(), path)
            b.shared["clip"] = ("ViT-L-14", path)
        else:
            from synthmill.testing.random_weights import save_tiny_clip

            b.shared["clip"] = (save_tiny_clip(os.path.join(b.work, "clip"), seed=0), None)
    return b.shared["clip"]


def _clip_spec(b: Bench) -> dict[str, Any]:
    model, pretrained = _clip_model(b)
    return {"clip": {"model": model, "pretrained": pretrained}}


class _Pairs:
    """(preprocessed image, caption) of each generated image, for a DataLoader."""

    def __init__(self, files: list[str], captions: list[str], preprocess: Any):
        self.files, self.captions, self.preprocess = files, captions, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.preprocess(im.convert("RGB")), self.captions[i]


def _clip_run(b: Bench) -> dict[str, float]:
    import open_clip
    import torch

    model_name, pretrained = _clip_model(b)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=b.device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    loader = torch.utils.data.DataLoader(_Pairs(b.files, b.captions, preprocess), batch_size=b.batch,
                                         num_workers=b.workers)
    cos = []
    with torch.inference_mode():
        for pixels, captions in loader:
            a = model.encode_image(pixels.to(b.device)).float()
            t = model.encode_text(tokenizer(list(captions)).to(b.device)).float()
            cos.append(torch.nn.functional.cosine_similarity(a, t).double().cpu().numpy())
    return {"clip_score": float(np.concatenate(cos).mean())}


#: metric name (synthmill's metrics table) -> how the benchmark runs it and its reference library
BASELINES: dict[str, Baseline] = {
    "fid": Baseline(_fid_spec, _fid_run, {"fid": 1e-4}, "pytorch-fid"),
    "is": Baseline(_is_spec, _is_run, {"inception_score.mean": 1e-3, "inception_score.std": 1e-2}, "torch-fidelity"),
    "clip": Baseline(_clip_spec, _clip_run, {"clip_score": 1e-4}, "open_clip (direct loop)"),
}


def baselines() -> dict[str, Baseline]:
    """BASELINES with the rows of the PLUG_INS modules that exist."""
    table = dict(BASELINES)
    for name in PLUG_INS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        table.update(module.BASELINES)
    return table


def _merge(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _entry(metrics: dict[str, Any], key: str) -> float:
    for part in key.split("."):
        metrics = metrics[part]
    return float(metrics)


def make_sets(work: str, n: int, size: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` generated PNGs with the first ``n`` COCO captions beside them, and ``n`` reference PNGs."""
    with open(COCO, encoding="utf-8") as fh:
        captions = [row["caption"] for row in csv.DictReader(fh, delimiter="\t")][:n]
    files = make_images(os.path.join(work, "generated"), n, size, seed=0)
    for path, caption in zip(files, captions, strict=True):
        Path(path[:-4] + ".txt").write_text(caption, encoding="utf-8")
    return files, make_images(os.path.join(work, "reference"), n, size, seed=1), captions


def _synthmill(b: Bench, metrics: list[str], sections: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    import yaml

    out = os.path.join(b.work, "eval")
    spec: dict[str, Any] = {"kind": "evaluate", "generated": {"path": b.generated}, "metrics": metrics,
                            "output": {"path": out},
                            "cluster": {"num_actors": 1, "batch_size": b.batch, "cpus_per_actor": b.threads,
                                        "decode_threads": max(b.workers, 1)}}
    _merge(spec, sections)
    path = os.path.join(b.work, "eval.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec, fh)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "synthmill.cli", "run", path], capture_output=True, text=True,
                          env=dict(os.environ, RAY_ADDRESS=""), cwd=REPO)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"synthmill run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
        return secs, json.load(fh)


def run(images: int, size: int, batch: int, threads: int, workers: int, full_size: bool,
        metrics: list[str] | None = None) -> dict[str, Any]:
    """Both sides on the same images; ``metrics``: only these (default: every metric with a baseline)."""
    import torch

    torch.set_num_threads(threads)
    work = tempfile.mkdtemp(prefix="synthmill-bench-evaluate-all-")
    try:
        files, reference_files, captions = make_sets(work, images, size)
        b = Bench(os.path.dirname(files[0]), os.path.dirname(reference_files[0]), files, reference_files, captions,
                  batch, threads, workers, "cuda" if torch.cuda.is_available() else "cpu", full_size, work)
        from synthmill.metrics.registry import METRICS

        table = baselines()
        unknown = sorted(set(metrics or ()) - set(METRICS))
        if unknown:
            raise SystemExit(f"--metrics: unknown {', '.join(unknown)} (the table has {', '.join(METRICS)})")
        skipped = {m: "no baseline" for m in METRICS if m not in table and m != "fid_stats"}  # fid covers fid_stats
        chosen = []
        for name in METRICS:
            if metrics is not None and name not in metrics:
                skipped.pop(name, None)
            elif name in table:
                why = table[name].unavailable(b)
                if why:
                    skipped[name] = why
                else:
                    chosen.append(name)
        sections: dict[str, Any] = {}
        for name in chosen:
            _merge(sections, table[name].spec(b))  # writes the weights files before either side is timed
        seconds, theirs = {}, {}
        for name in chosen:
            t = time.perf_counter()
            theirs[name] = table[name].run(b)
            seconds[name] = time.perf_counter() - t
        ours_s, metrics_json = _synthmill(b, chosen, sections)
        agree = {}
        for name in chosen:
            for key, tol in table[name].tolerance.items():
                ours, ref = _entry(metrics_json["metrics"], key), theirs[name][key]
                rel = abs(ours - ref) / max(abs(ref), 1e-12)
                agree[key] = {"synthmill": ours, "library": ref, "rel_diff": rel, "tolerance": tol, "ok": rel <= tol}
        baseline_s = sum(seconds.values())
        return {
            "images": images, "size": size, "batch": batch, "threads": threads, "workers": workers,
            "device": b.device, "full_size": full_size, "metrics": chosen, "skipped": skipped,
            "libraries": {name: table[name].library for name in chosen},
            "baseline_s": seconds, "baselines_total_s": baseline_s, "synthmill_s": ours_s,
            "synthmill_elapsed_s": metrics_json.get("elapsed_s"),
            "images_per_s": {"baselines": images / baseline_s, "synthmill": images / ours_s},
            "ratio": baseline_s / ours_s, "agree": agree, "all_agree": all(a["ok"] for a in agree.values()),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(r: dict[str, Any]) -> str:
    lines = [f"{r['images']} generated + {r['images']} reference PNGs of {r['size']}x{r['size']}, batch {r['batch']}, "
             f"{r['threads']} torch threads, {r['workers']} decode workers, device {r['device']}, "
             f"{'full-size' if r['full_size'] else 'tiny'} CLIP", "",
             "| run | seconds | images/s |", "| --- | ---: | ---: |"]
    for name, secs in r["baseline_s"].items():
        lines.append(f"| (a) {name}: {r['libraries'][name]} | {secs:.2f} | {r['images'] / secs:.2f} |")
    lines.append(f"| (a) all of them, one after another | {r['baselines_total_s']:.2f} | "
                 f"{r['images_per_s']['baselines']:.2f} |")
    lines.append(f"| (b) synthmill run, {', '.join(r['metrics'])} in one pass (1 actor, end to end) | "
                 f"{r['synthmill_s']:.2f} | {r['images_per_s']['synthmill']:.2f} |")
    lines.append("")
    for key, a in r["agree"].items():
        lines.append(f"{key}: synthmill {a['synthmill']:.6g}, library {a['library']:.6g}, relative difference "
                     f"{a['rel_diff']:.1e} (tolerance {a['tolerance']:.0e}: {'agree' if a['ok'] else 'DIFFER'})")
    if r["skipped"]:
        lines.append("not run: " + ", ".join(f"{m} ({why})" for m, why in r["skipped"].items()))
    lines.append(f"synthmill's own elapsed_s (metrics.json, after the interpreter started): "
                 f"{r['synthmill_elapsed_s']}")
    lines.append(f"ratio (b)/(a) images/s = {r['ratio']:.3f}; numbers agree: {'yes' if r['all_agree'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks evaluate-all", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    p.add_argument("--workers", type=int, default=min(4, 2 * multiprocessing.cpu_count()),
                   help="decode workers, both sides (default: torch-fidelity's fixed choice)")
    p.add_argument("--full-size", action="store_true", help="ViT-L-14 CLIP instead of a tiny one (for a GPU)")
    p.add_argument("--metrics", default=None, help="comma-separated: only these metrics (default: all with a baseline)")
    p.add_argument("--smoke", action="store_true",
                   help="a few tiny images: checks the code runs (with --metrics: those metrics)")
    args = p.parse_args(argv)
    if args.smoke:  # the smoke's settings; --metrics, when given, still picks the metrics
        args = SimpleNamespace(**{**SMOKE, "metrics": args.metrics or SMOKE["metrics"]}, smoke=True)
    from benchmarks.child import rerun_under_cpu_malloc

    code = rerun_under_cpu_malloc("benchmarks.evaluate_all", argv if argv is not None else sys.argv[1:])
    if code is not None:  # on a CPU: the baselines, run in this process, get the actors' allocator settings
        return code
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    metrics = args.metrics.split(",") if isinstance(args.metrics, str) else args.metrics
    r = run(args.images, args.size, args.batch, args.threads, args.workers, args.full_size, metrics)
    print(render(r))
    return 0 if r["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
