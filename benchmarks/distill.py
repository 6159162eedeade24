"""Distillation training throughput: a plain PyTorch loop vs ``synthmill run`` of a distill job, same run.

A teacher pipeline is built in code (``--teacher tiny``: testing/tiny.py's full SD 1.x block structure at
tiny widths; ``--teacher sd-v1.4``: the real SD v1.4 UNet, VAE and CLIP ViT-L text encoder layouts with
random weights, for a GPU) and saved with ``save_pretrained``; ``--images`` seeded PNGs of ``--size``
pixels with COCO captions beside them are the data. Then, with the same student layout (``--arch``),
batch, resolution, precision and loss:

(a) plain loop: one process, the frozen VAE / text encoder / teacher and the student on one device,
    batches pre-decoded in memory (no data loading at all), AdamW steps; on a CPU one torch thread (the
    workers' ``cpus_per_worker`` default) and synthmill's CPU malloc settings (the benchmark reruns itself in
    a child process with them);
(b) ``synthmill run`` of a distill job with 1 Ray Train worker (its data stream, DDP wrapper, metrics,
    checkpoints at the end);
(c) the same with 2 workers (``--workers``), when the machine has the CPUs or GPUs for them;
(d)/(e) with ``--latents``: (b) over the images in one tar, then over the same tar with each sample's latents
    beside its image (``KEY.latents.npy``, what a generate job with ``output.save_latents`` writes; here the
    teacher VAE's encodings of the images), which the job trains on instead of running the VAE encoder.

Printed: steady-state samples/s of each (the first ``--warmup`` steps excluded; (b) and (c) from their
``metrics.jsonl``), end-to-end samples/s of (b)/(c) (start-up, model load and export included), the
ratios to (a), and on a GPU the peak memory of (a).

    python -m benchmarks.distill               # the CPU numbers of RESULTS.md
    python -m benchmarks.distill --smoke       # seconds of training; what tests/test_benchmarks.py runs
    python -m benchmarks.distill --teacher sd-v1.4 --size 512 --batch 8 --arch bk-small   # on a GPU
    python -m benchmarks.distill --latents --workers 1 --size 64     # the with/without-latents rows
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from typing import Any

from benchmarks.child import rerun_under_cpu_malloc, run_streamed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Printed first: what (a) and synthmill's side share, and where the job runs off synthmill's own defaults.
SHARED = ("shared by (a) and synthmill run: batch, resolution, learning rate, fp16 autocast on a GPU (float32 on a "
          "CPU), on a CPU 1 torch thread a process or worker (cluster.cpus_per_worker 1, synthmill's default) and "
          "synthmill's CPU malloc settings, the first --warmup steps left out of steady state; differs: (a) trains "
          "on batches decoded in memory, synthmill run decodes with data.loader_workers 1 (its default 2)")
SMOKE = {"images": 4, "size": 32, "batch": 2, "steps": 2, "warmup": 1, "workers": 1}


def make_teacher(kind: str, folder: str) -> str:
    """Save the teacher pipeline ``kind`` (tiny | sd-v1.4) to ``folder``."""
    if kind == "tiny":
        from synthmill.testing.tiny import save_tiny_pipeline

        return save_tiny_pipeline(folder, "sd", seed=0, unet_layout="full")
    if kind != "sd-v1.4":
        raise SystemExit(f"unknown --teacher {kind!r}; choose tiny or sd-v1.4")
    from synthmill.testing.full_size import save_random_pipeline

    return save_random_pipeline(folder, "sd15", seed=0)  # SD v1.x's UNet, VAE and CLIP ViT-L layouts


def make_data(folder: str, n: int, size: int) -> str:
    """``n`` seeded PNGs with a COCO caption ``.txt`` beside each (an image-folder data set)."""
    from benchmarks.extract import make_images

    with open(os.path.join(REPO, "configs", "prompts", "coco2014_5k_captions.tsv"), encoding="utf-8") as fh:
        captions = [row["caption"] for row in csv.DictReader(fh, delimiter="\t")]
    for i, path in enumerate(make_images(folder, n, size)):
        with open(path[:-4] + ".txt", "w", encoding="utf-8") as fh:
            fh.write(captions[i % len(captions)])
    return folder


def make_tar(teacher: str, folder: str, tar: str, latents: bool) -> str:
    """The image folder's samples in one WebDataset tar; with ``latents``, each with ``KEY.latents.npy`` beside it
    (the teacher VAE's mean encoding, scaled, float16)."""
    import glob
    import io
    import tarfile

    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae") if latents else None
    with tarfile.open(tar, "w") as out:
        for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
            key = os.path.basename(png)[:-4]
            members = {"png": open(png, "rb").read(), "txt": open(png[:-4] + ".txt", "rb").read()}
            if vae is not None:
                pixels = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy())
                with torch.no_grad():
                    dist = vae.encode(pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)[None]).latent_dist
                buf = io.BytesIO()
                np.save(buf, (dist.mean[0] * vae.config.scaling_factor).to(torch.float16).numpy())
                members["latents.npy"] = buf.getvalue()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return tar


def plain_loop(teacher: str, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """(a): the same training step in one process, pre-decoded batches, no Ray, no loader."""
    import torch
    from diffusers import DDPMScheduler

    from synthmill.distill.data import ShardStream, StreamSpec
    from synthmill.distill.train import build_student, encode_text, load_teacher, tokenizers
    from synthmill.jobs.distill_spec import DistillSpec, StudentSpec, TeacherSpec
    from synthmill.models.kd import DistillLoss, LossWeights
    from synthmill.sharding.images import open_image_set

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as one Ray Train worker with cpus_per_worker 1
    spec = DistillSpec(teacher=TeacherSpec(path=teacher), student=StudentSpec(arch=args.arch))
    pipe = load_teacher(spec.teacher, None)
    student = build_student(spec, pipe.unet)
    amp = device.type == "cuda"
    frozen = torch.float16 if amp else torch.float32
    teacher_unet = pipe.unet.to(device, frozen).requires_grad_(False).eval()
    pipe.vae.to(device, frozen).requires_grad_(False)
    pipe.text_encoder.to(device, frozen).requires_grad_(False)
    student = student.to(device).train()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    loss_fn = DistillLoss(student, teacher_unet, LossWeights())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    units = open_image_set(data, None, 1000).units
    stream = ShardStream(StreamSpec(units, args.size, True, False, 0, args.batch, 0),
                         tokenizers(pipe), 0, 1).iter_as(0, 1)
    items = [next(stream) for _ in range(args.batch)]
    batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _step in range(args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = pipe.vae.encode(batch["pixel_values"].to(device, frozen)).latent_dist.sample()
            latents = (latents * pipe.vae.config.scaling_factor).float()
            cond = encode_text(pipe, batch, device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            total, _ = loss_fn(sched.add_noise(latents, noise, t), t, cond, noise)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[args.warmup:] or times
    out = {"samples_per_s": args.batch * len(steady) / sum(steady), "device": str(device)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def synthmill_job(teacher: str, data: str, workdir: str, workers: int, args: argparse.Namespace,
                  name: str = "") -> dict[str, Any]:
    """(b)/(c): ``synthmill run`` of the same training as a distill job, in a fresh process."""
    import yaml

    out = os.path.join(workdir, f"out-{workers}{name}")
    spec = {
        "kind": "distill",
        "teacher": {"path": teacher},
        "student": {"arch": args.arch},
        "data": {"path": data, "resolution": args.size, "loader_workers": 1, "shuffle_buffer": 0},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1.0e-5,
                  "gradient_checkpointing": args.gradient_checkpointing, "checkpoint_every": args.steps,
                  "log_every": 1},
        "cluster": {"num_workers": workers},
        "output": {"path": out},
    }
    path = os.path.join(workdir, f"distill-{workers}{name}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec, fh)
    try:
        wall, _ = run_streamed([sys.executable, "-m", "synthmill.cli", "run", path],
                               f"synthmill run ({workers} worker)", cwd=REPO)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    steady = [r["samples_per_s"] for r in lines if r["step"] > args.warmup]
    samples = args.steps * args.batch * workers
    return {"samples_per_s": sum(steady) / len(steady), "end_to_end": samples / wall, "wall_s": wall,
            "final_loss": lines[-1]["loss"], "vae_encoded": sum(r.get("vae_encoded", 0) for r in lines)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="tiny", help="tiny | sd-v1.4 (full size, random weights)")
    p.add_argument("--arch", default="bk-small")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="training resolution (square)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady-state rate")
    p.add_argument("--workers", type=int, default=2, help="workers of (c); 1 skips it")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--latents", action="store_true", help="also (d)/(e): without and with stored latents")
    p.add_argument("--latents-only", action="store_true", help="(d)/(e) alone: no (a), (b) or (c)")
    p.add_argument("--rounds", type=int, default=1,
                   help="(d)/(e) rounds, in alternating order (d e, e d, ...); the ratio is the median of the rounds'")
    p.add_argument("--smoke", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    code = rerun_under_cpu_malloc("benchmarks.distill", argv if argv is not None else sys.argv[1:])
    if code is not None:
        return code
    print(SHARED, flush=True)
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-distill-") as work:
        teacher = make_teacher(args.teacher, os.path.join(work, "teacher"))
        data = make_data(os.path.join(work, "data"), args.images, args.size)
        rows: list[tuple[str, float, float | None]] = []
        a = None
        if not args.latents_only:
            a = plain_loop(teacher, data, args)
            print(f"(a) plain loop ({a['device']}): {a['samples_per_s']:.2f} samples/s"
                  + (f", peak {a['peak_gib']:.1f} GiB on {a['gpu']}" if "peak_gib" in a else ""), flush=True)
            rows.append(("(a) plain PyTorch loop, 1 process", a["samples_per_s"], None))
            for workers in sorted({1, args.workers}):
                r = synthmill_job(teacher, data, work, workers, args)
                label = f"({'b' if workers == 1 else 'c'}) synthmill run, {workers} worker{'s' if workers > 1 else ''}"
                rows.append((label, r["samples_per_s"], r["end_to_end"]))
                print(f"{label}: {r['samples_per_s']:.2f} samples/s steady, {r['end_to_end']:.2f} end to end "
                      f"({r['wall_s']:.1f}s wall, final loss {r['final_loss']:.4f})", flush=True)
        if args.latents or args.latents_only:
            rows += latents_rounds(teacher, data, work, args)
    print(f"\nteacher {args.teacher}, student {args.arch}, {args.size}x{args.size}, batch {args.batch} per worker, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    print(f"{'':44s} {'samples/s':>10s} {'vs (a)':>8s} {'end-to-end':>11s}")
    for label, rate, e2e in rows:
        vs_a = f"{rate / a['samples_per_s']:8.3f}" if a else f"{'':8s}"
        print(f"{label:44s} {rate:10.2f} {vs_a} {'' if e2e is None else f'{e2e:11.2f}'}")
    return 0


def latents_rounds(teacher: str, data: str, work: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(d)/(e): the same 1-worker job over one tar without and with stored latents, ``--rounds`` times in
    alternating order (so a change in the machine's load falls on both sides); rows of the medians."""
    import statistics

    tars = {latents: make_tar(teacher, data, os.path.join(work, f"data-{int(latents)}.tar"), latents)
            for latents in (False, True)}
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    ratios = []
    for i in range(args.rounds):
        for latents in ((False, True) if i % 2 == 0 else (True, False)):
            r = synthmill_job(teacher, tars[latents], work, 1, args, f"-tar{int(latents)}-{i}")
            runs[latents].append(r)
            print(f"round {i + 1}, ({'e' if latents else 'd'}) tar {'with' if latents else 'no'} latents: "
                  f"{r['samples_per_s']:.2f} samples/s steady, {r['end_to_end']:.2f} end to end "
                  f"({r['wall_s']:.1f}s wall, final loss {r['final_loss']:.4f}, VAE encoded {r['vae_encoded']} "
                  "samples)", flush=True)
        ratios.append(runs[True][-1]["samples_per_s"] / runs[False][-1]["samples_per_s"])
    print(f"stored latents: {statistics.median(ratios):.3f}x the samples/s of encoding them (median of "
          f"{len(ratios)} round{'s' if len(ratios) > 1 else ''}: {', '.join(f'{x:.3f}' for x in ratios)})", flush=True)
    return [(f"({'e' if latents else 'd'}) synthmill run, 1 worker, tar {'with' if latents else 'no'} latents",
             statistics.median(r["samples_per_s"] for r in runs[latents]),
             statistics.median(r["end_to_end"] for r in runs[latents])) for latents in (False, True)]


if __name__ == "__main__":
    sys.exit(main())
