"""Study: the wall time of a two-model ``kind: study`` against the same work as four sequential jobs.

Two tiny SD pipelines (``synthmill.testing.tiny``, seeds 0 and 1), a random-weight Inception file and a tiny
open_clip model (``synthmill.testing.random_weights``), and a reference folder of real-looking images (the
first model's images at another seed). Each variant runs in a fresh child process on a local Ray it starts
(``--cpus`` CPUs); the time counted starts once Ray is up:

(a) ``kind: study`` with both models (generate and evaluate of each; each model's shards are scored as they are
    committed, and model 2 generates while model 1's last shards are scored);
(b) the same four jobs one after another: generate 1, evaluate 1, generate 2, evaluate 2.

Printed: the seconds of each, the generate jobs' own seconds in (b), and the ratios (a)/(b) (goal <= 0.85) and
(a)/(sum of (b)'s generate jobs) (goal <= 1.15), and the machine's load average before and after. The study's
table numbers are checked equal to (b)'s.

    python -m benchmarks study              # 16 prompts at 64x64, 4 steps
    python -m benchmarks study --smoke      # 4 prompts at 32x32, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SMOKE = {"prompts": 4, "size": 32, "steps": 2, "per_shard": 2}


def _specs(root: str, args: argparse.Namespace) -> dict[str, Any]:
    models = [{"name": "m1", "path": os.path.join(root, "m1")}, {"name": "m2", "path": os.path.join(root, "m2")}]
    evaluate = {"reference": {"path": os.path.join(root, "reference")}, "metrics": ["fid", "is", "clip"],
                "fid": {"weights": os.path.join(root, "inception.pth")},
                "clip": {"model": f"local-dir:{os.path.join(root, 'clip')}", "pretrained": None},
                "inception_score": {"splits": 2}, "cluster": {"num_actors": args.actors, "batch_size": 8}}
    return {
        "kind": "study",
        "prompts": {"path": str(REPO / "configs" / "prompts" / "coco2014_5k_captions.tsv"), "column": "caption",
                    "limit": args.prompts},
        "sampling": {"steps": args.steps, "guidance_scale": 7.5, "height": args.size, "width": args.size, "seed": 0},
        "models": models, "evaluate": evaluate,
        "output": {"path": os.path.join(root, "study"), "samples_per_shard": args.per_shard},
        "cluster": {"num_actors": args.actors, "batch_size": 4},
    }


def _sequential_specs(study: dict[str, Any], root: str) -> list[dict[str, Any]]:
    jobs = []
    for m in study["models"]:
        gen_out = os.path.join(root, "seq", "gen", m["name"])
        jobs.append({"kind": "generate", "model": {"path": m["path"]}, "prompts": study["prompts"],
                     "sampling": study["sampling"], "output": {**study["output"], "path": gen_out},
                     "cluster": study["cluster"]})
        jobs.append({"kind": "evaluate", **study["evaluate"], "generated": {"path": gen_out},
                     "output": {"path": os.path.join(root, "seq", "eval", m["name"])}})
    return jobs


def child(kind: str, root: str, cpus: str) -> dict[str, Any]:
    """In a fresh process: start a local Ray, then time (a) the study or (b) the four jobs."""
    import ray
    import yaml

    from synthmill.jobs.kinds import KINDS
    from synthmill.jobs.spec import load_spec

    ray.init(address="local", num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
    with open(os.path.join(root, "study.yaml"), encoding="utf-8") as fh:
        study = yaml.safe_load(fh)
    specs = [study] if kind == "a" else _sequential_specs(study, root)
    seconds, results = [], []
    wall0 = time.time()
    for i, spec in enumerate(specs):
        path = os.path.join(root, f"{kind}{i}.yaml")
        Path(path).write_text(yaml.safe_dump(spec))
        t0 = time.perf_counter()
        loaded = load_spec(path)
        runner = KINDS[loaded.kind].module()
        results.append(runner.run(runner.prepare(loaded)))
        seconds.append(time.perf_counter() - t0)
    ray.shutdown()
    if kind == "a":
        with open(os.path.join(study["output"]["path"], "table.json"), encoding="utf-8") as fh:
            rows = json.load(fh)["rows"]
        numbers = [[r["fid"], r["is_mean"], r["clip_score"]] for r in rows]
        return {"seconds": seconds, "numbers": numbers, "timeline": _timeline(study, wall0)}
    else:
        numbers = [[r["metrics"]["fid"], r["metrics"]["inception_score"]["mean"], r["metrics"]["clip_score"]]
                   for r in results[1::2]]
    return {"seconds": seconds, "numbers": numbers}


def _timeline(study: dict[str, Any], wall0: float) -> list[list[Any]]:
    """[what, start, end] of each job of the study, in seconds from the study's start: a generate job from its
    summary.json (its run's start, to the second it took), an evaluation from its metrics.json (started_at, to the
    second, and its seconds)."""
    from datetime import datetime

    out = []
    for m in study["models"]:
        root = study["output"]["path"]
        with open(os.path.join(root, "models", m["name"], "summary.json"), encoding="utf-8") as fh:
            g = json.load(fh)
        with open(os.path.join(root, "scores", m["name"], "metrics.json"), encoding="utf-8") as fh:
            e = json.load(fh)
        start = datetime.fromisoformat(e["started_at"]).timestamp()
        began = g["run_started_unix"] - wall0
        out.append([f"generate {m['name']}", began, began + g["elapsed_s"]])
        out.append([f"evaluate {m['name']}", start - wall0, start + e["elapsed_s"] - wall0])
    return out


def _build(root: str, args: argparse.Namespace) -> None:
    from PIL import Image

    from synthmill.testing.random_weights import save_random_inception, save_tiny_clip
    from synthmill.testing.tiny import save_tiny_pipeline

    save_tiny_pipeline(os.path.join(root, "m1"), "sd", seed=0)
    save_tiny_pipeline(os.path.join(root, "m2"), "sd", seed=1)
    save_random_inception(os.path.join(root, "inception.pth"), seed=0)
    save_tiny_clip(os.path.join(root, "clip"), seed=0)
    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "reference"))
    for i in range(max(8, args.prompts)):
        pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "reference", f"{i:06d}.png"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs")
    ap.add_argument("--smoke", action="store_true", help="4 prompts at 32x32, 2 steps")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)))
        return 0
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    import yaml

    root = tempfile.mkdtemp(prefix="studybench-")
    try:
        _build(root, args)
        Path(root, "study.yaml").write_text(yaml.safe_dump(_specs(root, args)))
        print(f"two tiny SD models, {args.prompts} prompts at {args.size}x{args.size}, {args.steps} steps, "
              f"{args.per_shard} samples a shard, {args.actors} actor(s) a job, local Ray with {args.cpus} CPUs",
              flush=True)
        print("load average before (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
        out = {}
        for kind in ("a", "b"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.study", "--child", kind, root, str(args.cpus)],
                                  capture_output=True, text=True, cwd=str(REPO))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            out[kind] = json.loads(lines[-1][len("RESULT "):])
        a, b = sum(out["a"]["seconds"]), sum(out["b"]["seconds"])
        gen = out["b"]["seconds"][0] + out["b"]["seconds"][2]
        print(f"(a) study:            {a:8.1f} s")
        print(f"(b) sequential jobs:  {b:8.1f} s  (generate {out['b']['seconds'][0]:.1f} + evaluate "
              f"{out['b']['seconds'][1]:.1f} + generate {out['b']['seconds'][2]:.1f} + evaluate "
              f"{out['b']['seconds'][3]:.1f})")
        print(f"ratio (a)/(b):                    {a / b:.3f}  (goal <= 0.85)")
        print(f"ratio (a)/(generate jobs alone):  {a / gen:.3f}  (goal <= 1.15)")
        print("(a)'s jobs, seconds from its start: " + "; ".join(f"{what} {t0:.0f}-{t1:.0f}"
                                                             for what, t0, t1 in out["a"]["timeline"]))
        print("load average after (1, 5, 15 min):  " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        same = out["a"]["numbers"] == out["b"]["numbers"]
        print(f"table numbers equal the sequential jobs' (FID, IS, CLIP of both models): {same}")
        return 0 if same else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
