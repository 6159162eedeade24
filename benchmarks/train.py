"""Training throughput of the three training objectives beyond KD: ``synthmill run`` against a plain loop.

For each of ``--methods`` (``finetune``: the task loss on the model's own UNet; ``lcm``: latent consistency
distillation with a guidance embedding and an EMA target; ``lcm-lora``: LCM-LoRA adapters of rank
``--rank``), with the same model, batch, resolution, precision and learning rate:

(a) plain loop: one process, no Ray, no DDP wrapper, no data loader (batches pre-decoded in memory), no
    checkpoints or metrics file: the objective's own row of distill/objectives.OBJECTIVES (its networks,
    its loss, its ``after_step``: LCM's EMA target) stepped by AdamW with gradient clipping, as the
    example scripts of diffusers (train_text_to_image.py, train_lcm_distill_sd_wds.py and its LoRA twin)
    step theirs. What is measured is what the job adds around the same math.
(b) ``synthmill run`` of the job with 1 Ray Train worker (its data stream, DDP wrapper, EMA, metrics.jsonl,
    a checkpoint and the export at the end);
(c) the same with ``--workers`` workers, when that is more than 1.

On the CPU each process (a) and each worker of (b)/(c) gets one torch thread (``cpus_per_worker: 1``), so
(c) is the only side with more cores, and the plain loop runs under the glibc malloc settings synthmill gives
its CPU workers (the benchmark reruns itself in a child process with them, as the generate benchmark does).
Printed: steady-state samples/s (the first ``--warmup`` steps left out; (b)/(c) from their metrics.jsonl),
end-to-end samples/s of (b)/(c), and the ratios to (a).

    python -m benchmarks train                   # the CPU numbers of RESULTS.md (tiny SD 1.x teacher)
    python -m benchmarks train --smoke           # seconds of each; what tests/test_benchmarks.py runs
    python -m benchmarks train --teacher sd-v1.4 --size 512 --batch 8 --steps 30 --workers 1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import yaml

from benchmarks.child import rerun_under_cpu_malloc, run_streamed
from benchmarks.distill import REPO, make_data, make_teacher

METHODS = ("finetune", "lcm", "lcm-lora")
#: Printed first: what (a) and synthmill's side share, and where the job runs off synthmill's own defaults.
SHARED = ("shared by (a) and synthmill run: batch, resolution, learning rate, fp16 autocast on a GPU (float32 on a "
          "CPU), on a CPU 1 torch thread a process or worker (cluster.cpus_per_worker 1, synthmill's default) and "
          "synthmill's CPU malloc settings, the first --warmup steps left out of steady state; differs: (a) trains "
          "on batches decoded in memory, synthmill run decodes with data.loader_workers 1 (its default 2)")
SMOKE = {"images": 4, "size": 32, "batch": 2, "steps": 2, "warmup": 1, "workers": 1}


def job_spec(method: str, teacher: str, data: str, out: str, workers: int, args: argparse.Namespace) -> dict:
    """The job ``synthmill run`` trains for ``method`` (and whose settings the plain loop takes)."""
    train = {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1.0e-5, "log_every": 1,
             "checkpoint_every": args.steps, "mixed_precision": "fp16",
             "gradient_checkpointing": args.gradient_checkpointing}
    common = {"data": {"path": data, "resolution": args.size, "loader_workers": 1, "shuffle_buffer": 0},
              "train": train, "cluster": {"num_workers": workers, "cpus_per_worker": 1}, "output": {"path": out}}
    if method == "finetune":
        return {"kind": "finetune", "model": {"path": teacher}, "lora": {"rank": None}, **common}
    student: dict[str, Any] = {"arch": "teacher"}
    if method == "lcm-lora":
        student["lora"] = {"rank": args.rank}
    return {"kind": "distill", "method": "lcm", "teacher": {"path": teacher}, "student": student,
            "lcm": {"num_ddim_timesteps": 50, "time_cond_proj_dim": 256}, **common}


def _load(spec: dict, folder: str, name: str) -> Any:
    from synthmill.jobs.spec import load_spec

    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec, fh)
    return path, load_spec(path)


def plain_loop(spec: Any, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """(a): the objective's row stepped in one process, on pre-decoded batches."""
    import torch
    from diffusers import DDPMScheduler

    from synthmill.distill.data import ShardStream, StreamSpec
    from synthmill.distill.objectives import MicroBatch, load_pipeline_fp32, objective
    from synthmill.distill.train import encode_text, tokenizers
    from synthmill.sharding.images import open_image_set

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as one Ray Train worker with cpus_per_worker 1
    amp = device.type == "cuda"
    frozen = torch.float16 if amp else torch.float32
    kind = objective(spec.objective())
    pipe = load_pipeline_fp32(kind.model_spec(spec), None)
    obj = kind(spec, pipe, DDPMScheduler.from_config(pipe.scheduler.config))
    module = obj.build()
    obj.place(module, device, frozen)
    pipe.vae.to(device, frozen).requires_grad_(False).eval()
    pipe.text_encoder.to(device, frozen).requires_grad_(False).eval()
    module.train()
    if args.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    params = obj.parameters(module)
    obj.bind(module)
    opt = torch.optim.AdamW(params, lr=spec.train.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    units = open_image_set(data, None, 1000).units
    stream = ShardStream(StreamSpec(units, args.size, True, False, 0, args.batch, 0),
                         tokenizers(pipe), 0, 1).iter_as(0, 1)
    items = [next(stream) for _ in range(args.batch)]
    batch = {k: torch.stack([s[k] for s in items]) for k in items[0] if torch.is_tensor(items[0][k])}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        gen = torch.Generator(device).manual_seed(step)
        with torch.no_grad():
            latents = pipe.vae.encode(batch["pixel_values"].to(device, frozen)).latent_dist.sample(generator=gen)
            latents = (latents * pipe.vae.config.scaling_factor).float()
            cond = encode_text(pipe, batch, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            total, values = obj.loss(MicroBatch(latents, cond, gen, step, 0))
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        obj.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(values["loss"])
    steady = times[args.warmup:] or times
    out = {"samples_per_s": args.batch * len(steady) / sum(steady), "device": str(device), "final_loss": losses[-1]}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def synthmill_job(path: str, out: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """(b)/(c): ``synthmill run`` of the job in a fresh process."""
    try:
        wall, _ = run_streamed([sys.executable, "-m", "synthmill.cli", "run", path],
                               f"synthmill run ({workers} worker)", cwd=REPO)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    steady = [r["samples_per_s"] for r in lines if r["step"] > args.warmup] or [lines[-1]["samples_per_s"]]
    samples = args.steps * args.batch * workers
    return {"samples_per_s": sum(steady) / len(steady), "end_to_end": samples / wall, "wall_s": wall,
            "final_loss": lines[-1]["loss"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--teacher", default="tiny", help="tiny | sd-v1.4 (full size, random weights)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="training resolution (square)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5,
                   help="first steps left out of the steady-state rate (a job's first steps share the CPU with its "
                        "start)")
    p.add_argument("--workers", type=int, default=2, help="workers of (c); 1 skips it")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of lcm-lora")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    code = rerun_under_cpu_malloc("benchmarks.train", argv if argv is not None else sys.argv[1:])
    if code is not None:
        return code
    print(SHARED, flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown[0]!r}; choose from {', '.join(METHODS)}")
    rows: list[tuple[str, str, float, float | None, float]] = []
    with tempfile.TemporaryDirectory(prefix="synthmill-bench-train-") as work:
        teacher = make_teacher(args.teacher, os.path.join(work, "teacher"))
        data = make_data(os.path.join(work, "data"), args.images, args.size)
        for method in methods:
            _, spec = _load(job_spec(method, teacher, data, os.path.join(work, f"{method}-plain"), 1, args),
                            work, f"{method}-plain")
            a = plain_loop(spec, data, args)
            print(f"{method} (a) plain loop ({a['device']}): {a['samples_per_s']:.3f} samples/s, final loss "
                  f"{a['final_loss']:.4f}" + (f", peak {a['peak_gib']:.1f} GiB on {a['gpu']}" if "peak_gib" in a
                                                else ""), flush=True)
            rows.append((method, "(a) plain loop, 1 process", a["samples_per_s"], None, a["samples_per_s"]))
            for workers in sorted({1, args.workers}):
                out = os.path.join(work, f"{method}-{workers}")
                path, _ = _load(job_spec(method, teacher, data, out, workers, args), work, f"{method}-{workers}")
                r = synthmill_job(path, out, workers, args)
                label = f"({'b' if workers == 1 else 'c'}) synthmill run, {workers} worker{'s' if workers > 1 else ''}"
                rows.append((method, label, r["samples_per_s"], r["end_to_end"], a["samples_per_s"]))
                print(f"{method} {label}: {r['samples_per_s']:.3f} samples/s steady, {r['end_to_end']:.3f} end to "
                      f"end ({r['wall_s']:.1f}s wall, final loss {r['final_loss']:.4f})", flush=True)
    print(f"\nteacher {args.teacher}, {args.size}x{args.size}, batch {args.batch} per worker, {args.steps} steps "
          f"({args.warmup} warm-up), LoRA rank {args.rank}")
    print(f"{'':10s} {'':32s} {'samples/s':>10s} {'vs (a)':>8s} {'end-to-end':>11s}")
    for method, label, rate, e2e, base in rows:
        print(f"{method:10s} {label:32s} {rate:10.3f} {rate / base:8.3f} {'' if e2e is None else f'{e2e:11.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
