"""Start-up: from typing ``synthmill run`` to the first committed shard, broken down, against a plain script.

One small generate job (``--prompts`` COCO captions, one shard, one actor) on a tiny seeded SD pipeline
(or ``--model``) runs through the real console script in a fresh process, ``--repeats`` times. Its
``summary.json`` says when ``run()`` started (``run_started_unix``) and, from there, when Ray was
connected, when the first actor was ready (with its model-load time) and when the first shard was
committed; the launch time and the process's exit come from this benchmark's clock. Baseline, in the
same run: a fresh ``python`` process running the plain diffusers script up to its first batch of
images written to a tar (imports, ``from_pretrained``, one pipeline call, PNG encoding, ``TarWriter``).

With ``--s3`` the model is served by an S3-protocol server on 127.0.0.1 (moto's, as the tests use) and both
start from ``s3://``: the plain script downloads the folder with s3fs after its imports, then loads it;
``synthmill run`` on its own local Ray gets a fresh node cache (``SYNTHMILL_CACHE``) each run, so every
run downloads it (with ``--ray-address`` the cluster's actors keep their nodes' caches). Its actor starts
the download before importing torch and diffusers; its "model load" is what was left of the download
after the imports, plus the load.

    python -m benchmarks startup            # the numbers in RESULTS.md
    python -m benchmarks startup --smoke    # one repeat; what tests/test_benchmarks.py runs
    python -m benchmarks startup --s3 --model DIR   # a model from s3:// (DIR: e.g. a full-size pipeline)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from benchmarks.generate import PROMPTS_TSV, REPO, Settings, synthmill_command, write_spec

PLAIN_FIRST_BATCH = r"""
import sys, time
t0 = float(sys.argv[1])
import io
import torch
import webdataset
from diffusers import DiffusionPipeline
t_imports = time.time()
model = sys.argv[2]
if model.startswith("s3://"):
    import json, os, s3fs
    local = sys.argv[8]
    os.makedirs(local, exist_ok=True)
    s3fs.S3FileSystem(**json.loads(sys.argv[7])).get(model[len("s3://"):] + "/", local + "/", recursive=True)
    model = local
t_download = time.time()
pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
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
print(f"{t_imports - t0:.3f} {t_download - t_imports:.3f} {t_load - t_download:.3f} {t_batch - t_load:.3f}")
"""


def plain_first_batch(model: str, cfg: Settings, prompts: list[str], work: str,
                      storage: dict | None = None) -> dict[str, float]:
    """Seconds of a fresh plain script: start + imports (+ the download of an ``s3://`` model), model load,
    first batch written; and in all."""
    download = os.path.join(work, "plain-download")  # where the plain script puts an s3:// model
    launch = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_FIRST_BATCH, repr(launch), model, str(cfg.steps), str(cfg.size),
         "\x1f".join(prompts), os.path.join(work, "plain.tar"), json.dumps(storage or {}), download],
        cwd=REPO, capture_output=True, text=True)
    ended = time.time()
    shutil.rmtree(download, ignore_errors=True)  # after the timing: each run downloads afresh
    if proc.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{proc.stderr[-3000:]}")
    imports, download, load, batch = map(float, proc.stdout.split()[-4:])
    return {"start_and_imports": imports, "download": download, "model_load": load, "first_batch": batch,
            "to_first_tar": imports + download + load + batch, "total": ended - launch}


def synthmill_first_shard(spec_path: str, out: str, ray_address: str | None = None,
                          cache: str | None = None) -> dict[str, float]:
    """Seconds of ``synthmill run`` in a fresh process, from launch, split at the milestones of its summary.

    It starts its own local Ray, unless ``ray_address`` is given (then "Ray start" is a connection).
    ``cache``: the node's model cache (``SYNTHMILL_CACHE``; its actors inherit it from a local Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    if cache:
        env["SYNTHMILL_CACHE"] = cache
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
    p.add_argument("--ray-address",
                   help="join this Ray cluster instead of starting a local one (the test suite's smoke)")
    p.add_argument("--s3", action="store_true", help="serve the model from s3:// (a moto server on 127.0.0.1); "
                   "both download it in every run")
    return p


def local_ray_cpus() -> int:
    """The CPUs a local Ray will offer (it counts a container's CPU quota), else os.cpu_count(): the actor's
    ``cluster.cpus_per_actor`` on the benchmark's own Ray, so that it can be scheduled."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, min(os.cpu_count() or 1, int(get_num_cpus())))
    except Exception:  # a Ray without that private helper
        return os.cpu_count() or 1


@contextlib.contextmanager
def s3_model(folder: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``folder`` uploaded to a fresh S3-protocol server on 127.0.0.1: (its s3:// URL, storage options)."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # moto's server logs part uploads that s3fs retries
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        fs.put(folder.rstrip("/") + "/", "bench/model/", recursive=True)
        yield "s3://bench/model", options
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.prompts, args.size, args.repeats = 2, 32, 1
    import csv

    with open(PROMPTS_TSV, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        prompts = [row["caption"] for _, row in zip(range(args.prompts), reader, strict=False)]
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-startup-") as work:
        model = args.model
        if model is None:
            from synthmill.testing.tiny import save_tiny_pipeline

            model = save_tiny_pipeline(os.path.join(work, "tiny-sd"), "sd", seed=0)
        with contextlib.ExitStack() as stack:
            storage = None
            if args.s3:
                model, storage = stack.enter_context(s3_model(model))
            cfg = Settings(model=model, prompts=args.prompts, steps=args.steps, size=args.size,
                           batch_size=args.prompts, samples_per_shard=args.prompts, guidance_scale=7.5, seed=0,
                           repeats=args.repeats, cpus_per_actor=None)
            spec_path = os.path.join(work, "job.yaml")
            # On its own local Ray the actor gets this machine's CPUs (on a CPU, its torch threads), as many
            # as the plain script's torch uses; a joined cluster's CPUs are its own (the spec's default).
            cpus = None if args.ray_address else local_ray_cpus()
            write_spec(cfg, spec_path, cpus_per_actor=cpus, storage=storage)
            # synthmill's actors inherit SYNTHMILL_CACHE only from a local Ray this benchmark's run starts
            cache = os.path.join(work, "cache") if args.s3 and not args.ray_address else None
            plain, ours = [], []
            for r in range(args.repeats):  # interleaved, so drifts in machine speed hit both
                plain.append(plain_first_batch(model, cfg, prompts, work, storage))
                ours.append(synthmill_first_shard(spec_path, os.path.join(work, f"out{r}"), args.ray_address, cache))
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)  # the next run downloads afresh too
                print(f"repeat {r + 1}/{args.repeats}: plain to first tar {plain[-1]['to_first_tar']:.2f} s, "
                      f"synthmill run to first shard {ours[-1]['to_first_shard']:.2f} s", flush=True)
    best_p = min(plain, key=lambda d: d["to_first_tar"])
    best_s = min(ours, key=lambda d: d["to_first_shard"])
    source = ""
    if args.s3:
        source = ("; the model from s3:// (moto on 127.0.0.1), downloaded in every run" if cache else
                  "; the model from s3:// (moto on 127.0.0.1); synthmill's actors keep their node's cache (joined "
                  "cluster: only a cold node downloads)")
    print(f"\n{args.prompts} prompts in one shard, {args.size}x{args.size}, {args.steps} steps, best of {args.repeats}"
          f"; cluster.cpus_per_actor {cpus or 'default'}{source}")
    print("| stage | plain script s | synthmill run s |\n| --- | ---: | ---: |")
    rows = [
        ("process start, imports (plain: torch, diffusers; synthmill: its CLI) + validation",
         best_p["start_and_imports"], best_s["start_imports_validation"]),
        ("Ray start (local)", None, best_s["ray_start"]),
        ("actor start (scheduling, worker process, Ray's imports)", None, best_s["actor_start"]),
        ("torch / diffusers / transformers imports in the actor", None, best_s["actor_imports"]),
        *([("download of the s3:// model (synthmill: during the actor's imports, the rest in its model load)",
             best_p["download"], None)] if args.s3 else []),
        ("model load", best_p["model_load"], best_s["model_load"]),
        ("first batch -> first tar / committed shard", best_p["first_batch"], best_s["first_shard"]),
        ("**to the first tar / committed shard**", best_p["to_first_tar"], best_s["to_first_shard"]),
        ("after it: index, summary, Ray shutdown, exit", None, best_s["finish_and_exit"]),
        ("**launch to exit**", best_p["total"], best_s["total"]),
    ]
    for name, a, b in rows:
        print(f"| {name} | {'' if a is None else f'{a:.2f}'} | {'' if b is None else f'{b:.2f}'} |")
    ratio = best_p["to_first_tar"] / best_s["to_first_shard"]
    print(f"\nratio: time to first output, plain / synthmill = {ratio:.3f}; synthmill's fixed start-up beyond the "
          f"plain script: {best_s['to_first_shard'] - best_p['to_first_tar']:.2f} s; launch to exit, plain / synthmill "
          f"= {best_p['total'] / best_s['total']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
