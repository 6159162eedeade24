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

With ``--batch-size`` smaller than ``--prompts`` both run the whole job, batch by batch (the plain script
writes every batch into its one tar, synthmill's one shard holds them all): then launch to exit is the
figure to compare, given per round and as the median of the rounds' ratios. Every run's images are compared
with the plain script's, pixel for pixel. On a CPU the plain script runs under the glibc malloc settings of
synthmill's CPU actors and with the actor's torch threads, on CUDA with the actor's channels-last UNet and VAE,
so that the two differ only in what synthmill does.

    python -m benchmarks startup            # the numbers in RESULTS.md
    python -m benchmarks startup --smoke    # one repeat; what tests/test_benchmarks.py runs
    python -m benchmarks startup --s3 --model DIR   # a model from s3:// (DIR: e.g. a full-size pipeline)
    python -m benchmarks startup --prompts 192 --size 64 --steps 4 --batch-size 8 --repeats 3   # a short job
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from benchmarks.generate import REPO, Settings, read_prompts, same_images, synthmill_command, tar_images, write_spec

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
cuda = torch.cuda.is_available()  # what synthmill's dtype: auto picks: float16 on CUDA, float32 on CPU
pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float16 if cuda else torch.float32)
pipe = pipe.to("cuda" if cuda else "cpu")
if sys.argv[10] == "1":  # channels-last, as synthmill's model.channels_last (unset: on CUDA) gives the actor
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=torch.channels_last)
pipe.set_progress_bar_config(disable=True)
t_load = time.time()
prompts = sys.argv[5].split("\x1f")
batch = int(sys.argv[9])
t_first = None
with webdataset.TarWriter(sys.argv[6]) as w:
    for lo in range(0, len(prompts), batch):
        part = prompts[lo:lo + batch]
        gens = [torch.Generator("cpu").manual_seed(lo + j) for j in range(len(part))]
        images = pipe(part, num_inference_steps=int(sys.argv[3]), height=int(sys.argv[4]), width=int(sys.argv[4]),
                      generator=gens).images
        for j, im in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            w.write({"__key__": f"{lo + j:010d}", "png": buf.getvalue(), "txt": part[j]})
        t_first = t_first or time.time()
t_batch = time.time()
print(f"{t_imports - t0:.3f} {t_download - t_imports:.3f} {t_load - t_download:.3f} {t_first - t_load:.3f} "
      f"{t_batch - t_first:.3f}")
"""


def plain_first_batch(model: str, cfg: Settings, prompts: list[str], work: str,
                      storage: dict | None = None, threads: int | None = None) -> dict[str, float]:
    """Seconds of a fresh plain script: start + imports (+ the download of an ``s3://`` model), model load,
    first batch written, the other batches (``cfg.batch_size`` a call); and in all. On a CPU it gets
    synthmill's CPU actor malloc settings and ``threads`` torch threads (``OMP_NUM_THREADS``), as the actor;
    on CUDA the actor's channels-last UNet and VAE (:func:`plain_channels_last`)."""
    from synthmill.cluster.connect import CPU_MALLOC_ENV

    download = os.path.join(work, "plain-download")  # where the plain script puts an s3:// model
    env = dict(os.environ)
    if not on_gpu():
        env = {**CPU_MALLOC_ENV, **env}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    launch = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_FIRST_BATCH, repr(launch), model, str(cfg.steps), str(cfg.size),
         "\x1f".join(prompts), os.path.join(plain_tars(work), "plain.tar"), json.dumps(storage or {}), download,
         str(cfg.batch_size), "1" if plain_channels_last(cfg) else "0"],
        cwd=REPO, capture_output=True, text=True, env=env)
    ended = time.time()
    shutil.rmtree(download, ignore_errors=True)  # after the timing: each run downloads afresh
    if proc.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{proc.stderr[-3000:]}")
    imports, download, load, batch, rest = map(float, proc.stdout.split()[-5:])
    return {"start_and_imports": imports, "download": download, "model_load": load, "first_batch": batch,
            "to_first_tar": imports + download + load + batch, "rest": rest,
            "finish_and_exit": ended - launch - (imports + download + load + batch + rest), "total": ended - launch}


def plain_channels_last(cfg: Settings) -> bool:
    """Whether the actor runs channels-last (``model.channels_last``; unset: on CUDA only), and so the plain
    script: the same memory format on both sides."""
    options = dict(cfg.model_options)
    return bool(options["channels_last"]) if options.get("channels_last") is not None else on_gpu()


def plain_tars(work: str) -> str:
    """The folder of the plain script's tar (a folder of its own, read as synthmill's shards folder is)."""
    folder = os.path.join(work, "plain")
    os.makedirs(folder, exist_ok=True)
    return folder


def on_gpu() -> bool:
    """Whether this machine shows a GPU device file (as synthmill's local Ray decides it; cheap, no torch)."""
    from synthmill.cluster.connect import _gpu_devices

    return _gpu_devices()


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
    # the last shard committed: one actor's active window ends there (it starts when the actor was ready)
    last = max(st["first_shard_committed_s"], ready + max(a["active_s"] for a in summary["actors"]))
    return {
        "start_imports_validation": run0 - launch,
        "ray_start": st["ray_connected_s"],
        "actor_start": ready - st["ray_connected_s"] - imports - load,  # scheduling, process, Ray's own imports
        "actor_imports": imports,
        "model_load": load,
        "first_shard": st["first_shard_committed_s"] - ready,
        "to_first_shard": run0 - launch + st["first_shard_committed_s"],
        "rest": last - st["first_shard_committed_s"],
        "finish_and_exit": ended - (run0 + last),
        "total": ended - launch,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: a tiny seeded SD pipeline)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per pipeline call (default: all prompts in one call); smaller: the whole job, "
                        "batch by batch, compared launch to exit")
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
    prompts = read_prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-startup-") as work:
        model = args.model
        if model is None:
            from synthmill.testing.tiny import save_tiny_pipeline

            model = save_tiny_pipeline(os.path.join(work, "tiny-sd"), "sd", seed=0)
        with contextlib.ExitStack() as stack:
            storage = None
            if args.s3:
                model, storage = stack.enter_context(s3_model(model))
            batch = min(args.batch_size or args.prompts, args.prompts)
            cfg = Settings(model=model, prompts=args.prompts, steps=args.steps, size=args.size,
                           batch_size=batch, samples_per_shard=args.prompts, guidance_scale=7.5, seed=0,
                           repeats=args.repeats, cpus_per_actor=None)
            spec_path = os.path.join(work, "job.yaml")
            # On its own local Ray the actor gets this machine's CPUs (on a CPU, its torch threads), as many
            # as the plain script's torch uses; a joined cluster's CPUs are its own (the spec's default).
            cpus = None if args.ray_address else local_ray_cpus()
            write_spec(cfg, spec_path, cpus_per_actor=cpus, storage=storage)
            # synthmill's actors inherit SYNTHMILL_CACHE only from a local Ray this benchmark's run starts
            cache = os.path.join(work, "cache") if args.s3 and not args.ray_address else None
            plain, ours, same = [], [], []
            for r in range(args.repeats):  # interleaved, so drifts in machine speed hit both
                plain.append(plain_first_batch(model, cfg, prompts, work, storage, cpus))
                out = os.path.join(work, f"out{r}")
                ours.append(synthmill_first_shard(spec_path, out, args.ray_address, cache))
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)  # the next run downloads afresh too
                same.append(same_images(tar_images(plain_tars(work)), tar_images(os.path.join(out, "shards"))))
                shutil.rmtree(out, ignore_errors=True)
                print(f"repeat {r + 1}/{args.repeats}: plain to first tar {plain[-1]['to_first_tar']:.2f} s, "
                      f"launch to exit {plain[-1]['total']:.2f} s; synthmill run to first shard "
                      f"{ours[-1]['to_first_shard']:.2f} s, launch to exit {ours[-1]['total']:.2f} s; ratio "
                      f"{plain[-1]['total'] / ours[-1]['total']:.3f}; identical images {same[-1]}/{len(prompts)}; "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
    whole = batch < args.prompts
    key_p, key_s = ("total", "total") if whole else ("to_first_tar", "to_first_shard")
    best_p = min(plain, key=lambda d: d[key_p])
    best_s = min(ours, key=lambda d: d[key_s])
    source = ""
    if args.s3:
        source = ("; the model from s3:// (moto on 127.0.0.1), downloaded in every run" if cache else
                  "; the model from s3:// (moto on 127.0.0.1); synthmill's actors keep their node's cache (joined "
                  "cluster: only a cold node downloads)")
    threads = f"; the plain script with {cpus} torch threads and the actors' malloc settings" if (
        cpus and not on_gpu()) else ""
    print(f"\n{args.prompts} prompts in one shard, {args.size}x{args.size}, {args.steps} steps, batch {batch}, best "
          f"of {args.repeats}; cluster.cpus_per_actor {cpus or 'default'}{threads}{source}")
    print(f"both: channels-last {plain_channels_last(cfg)}, {'float16' if on_gpu() else 'float32'}; "
          + (f"differs from synthmill's defaults: cluster.cpus_per_actor {cpus} to match the plain script's torch "
             "threads (synthmill's default 1)" if cpus and cpus != 1 and not on_gpu()
             else "synthmill's defaults otherwise"))
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
        *([("the other batches (plain) / shards (synthmill)", best_p["rest"], best_s["rest"])] if whole else []),
        ("after it: (synthmill: index, summary, Ray shutdown) exit", best_p["finish_and_exit"],
         best_s["finish_and_exit"]),
        ("**launch to exit**", best_p["total"], best_s["total"]),
    ]
    for name, a, b in rows:
        print(f"| {name} | {'' if a is None else f'{a:.2f}'} | {'' if b is None else f'{b:.2f}'} |")
    ratios = sorted(p["total"] / s["total"] for p, s in zip(plain, ours, strict=True))
    median = statistics.median(ratios)
    print(f"\nidentical images, plain / synthmill: {min(same)}/{len(prompts)} in every run" if min(same) == max(same)
          else f"\nidentical images, plain / synthmill: {same} of {len(prompts)} per run")
    if not whole:
        ratio = best_p["to_first_tar"] / best_s["to_first_shard"]
        print(f"ratio: time to first output, plain / synthmill = {ratio:.3f}; synthmill's fixed start-up beyond the "
              f"plain script: {best_s['to_first_shard'] - best_p['to_first_tar']:.2f} s; launch to exit, plain / "
              f"synthmill = {best_p['total'] / best_s['total']:.3f}")
    print(f"ratio: launch to exit, plain / synthmill, median of {len(ratios)} interleaved rounds = {median:.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
