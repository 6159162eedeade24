"""Start-up: from typing ``synthmill run`` to the first committed shard, broken down, against a plain script.

One small generate job (``--prompts`` COCO captions, one shard, one actor) on a tiny seeded SD pipeline
(or ``--model``) runs through the real console script in a fresh process, ``--repeats`` times. Its
``summary.json`` says when ``run()`` started (``run_started_unix``) and, from there, when Ray was
connected, when the first actor was ready (with its model-load time) and when the first shard was
committed; the launch time and the process's exit come from this benchmark's clock. Baseline, in the
same run: a fresh ``python`` process running the plain diffusers script up to its first batch of
images written to a tar (imports, ``from_pretrained``, one pipeline call, PNG encoding, ``TarWriter``).

    python -m benchmarks startup            # the numbers in RESULTS.md
    python -m benchmarks startup --smoke    # one repeat; what tests/test_benchmarks.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.generate import REPO, PROMPTS_TSV, Settings, synthmill_command, write_spec

PLAIN_FIRST_BATCH = r"""
import sys, time
t0 = float(sys.argv[1])
import io
import torch
import webdataset
from diffusers import DiffusionPipeline
t_imports = time.time()
pipe = DiffusionPipeline.from_pretrained(sys.argv[2], dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
t_load = time.time()
prompts = sys.argv[5].split("\x1f")
gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
images = pipe(prompts, num_inference_steps=int(sys.argv[3]), height=int(sys.argv[4]), width=int(sys.argv[4]),
              generator=gens).images
with webdataset.TarWriter(sys.argv[6]) as w:
    for i, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        w.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": prompts[i]})
t_batch = time.time()
print(f"{t_imports - t0:.3f} {t_load - t_imports:.3f} {t_batch - t_load:.3f}")
"""


def plain_first_batch(model: str, cfg: Settings, prompts: list[str], work: str) -> dict[str, float]:
    """Seconds of a fresh plain script: start + imports, model load, first batch written; and in all."""
    launch = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_FIRST_BATCH, repr(launch), model, str(cfg.steps), str(cfg.size),
         "\x1f".join(prompts), os.path.join(work, "plain.tar")],
        cwd=REPO, capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{proc.stderr[-3000:]}")
    imports, load, batch = map(float, proc.stdout.split()[-3:])
    return {"start_and_imports": imports, "model_load": load, "first_batch": batch,
            "to_first_tar": imports + load + batch, "total": ended - launch}


def synthmill_first_shard(spec_path: str, out: str, ray_address: str | None = None) -> dict[str, float]:
    """Seconds of ``synthmill run`` in a fresh process, from launch, split at the milestones of its summary.

    It starts its own local Ray, unless ``ray_address`` is given (then "Ray start" is a connection)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    launch = time.time()
    proc = subprocess.run(synthmill_command() + ["run", spec_path, f"output.path={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"synthmill run failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    st, run0 = summary["startup"], summary["run_started_unix"]
    ready, load, imports = st["first_actor_ready_s"], st["first_actor_model_load_s"], st["first_actor_imports_s"]
    return {
        "start_imports_validation": run0 - launch,
        "ray_start": st["ray_connected_s"],
        "actor_start": ready - st["ray_connected_s"] - imports - load,  # scheduling, process, Ray's own imports
        "actor_imports": imports,
        "model_load": load,
        "first_shard": st["first_shard_committed_s"] - ready,
        "to_first_shard": run0 - launch + st["first_shard_committed_s"],
        "finish_and_exit": ended - (run0 + st["first_shard_committed_s"]),
        "total": ended - launch,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: a tiny seeded SD pipeline)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one (the test suite's smoke)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.prompts, args.size, args.repeats = 2, 32, 1
    import csv

    with open(PROMPTS_TSV, encoding="utf-8", newline="") as fh:
        prompts = [row["caption"] for _, row in zip(range(args.prompts), csv.DictReader(fh, delimiter="\t"))]
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-startup-") as work:
        model = args.model
        if model is None:
            from synthmill.models.tiny import save_tiny_pipeline

            model = save_tiny_pipeline(os.path.join(work, "tiny-sd"), "sd", seed=0)
        cfg = Settings(model=model, prompts=args.prompts, steps=args.steps, size=args.size,
                       batch_size=args.prompts, samples_per_shard=args.prompts, guidance_scale=7.5, seed=0,
                       repeats=args.repeats, cpus_per_actor=None)
        spec_path = os.path.join(work, "job.yaml")
        write_spec(cfg, spec_path, cpus_per_actor=None)
        plain, ours = [], []
        for r in range(args.repeats):  # interleaved, so drifts in machine speed hit both
            plain.append(plain_first_batch(model, cfg, prompts, work))
            ours.append(synthmill_first_shard(spec_path, os.path.join(work, f"out{r}"), args.ray_address))
            print(f"repeat {r + 1}/{args.repeats}: plain to first tar {plain[-1]['to_first_tar']:.2f} s, "
                  f"synthmill run to first shard {ours[-1]['to_first_shard']:.2f} s", flush=True)
    best_p = min(plain, key=lambda d: d["to_first_tar"])
    best_s = min(ours, key=lambda d: d["to_first_shard"])
    print(f"\n{args.prompts} prompts in one shard, {args.size}x{args.size}, {args.steps} steps, best of {args.repeats}")
    print("| stage | plain script s | synthmill run s |\n| --- | ---: | ---: |")
    rows = [
        ("process start, imports (plain: torch, diffusers; synthmill: its CLI) + validation",
         best_p["start_and_imports"], best_s["start_imports_validation"]),
        ("Ray start (local)", None, best_s["ray_start"]),
        ("actor start (scheduling, worker process, Ray's imports)", None, best_s["actor_start"]),
        ("torch / diffusers / transformers imports in the actor", None, best_s["actor_imports"]),
        ("model load", best_p["model_load"], best_s["model_load"]),
        ("first batch -> first tar / committed shard", best_p["first_batch"], best_s["first_shard"]),
        ("**to the first tar / committed shard**", best_p["to_first_tar"], best_s["to_first_shard"]),
        ("after it: index, summary, Ray shutdown, exit", None, best_s["finish_and_exit"]),
        ("**launch to exit**", best_p["total"], best_s["total"]),
    ]
    for name, a, b in rows:
        print(f"| {name} | {'' if a is None else f'{a:.2f}'} | {b:.2f} |")
    ratio = best_p["to_first_tar"] / best_s["to_first_shard"]
    print(f"\nratio: time to first output, plain / synthmill = {ratio:.3f}; synthmill's fixed start-up beyond the "
          f"plain script: {best_s['to_first_shard'] - best_p['to_first_tar']:.2f} s; launch to exit, plain / synthmill "
          f"= {best_p['total'] / best_s['total']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
