"""The training function each Ray Train worker runs: one DDP replica of what the objective trains.

The loop is the same for every objective (distill/objectives.py: KD, the task loss of a fine-tune, ...).
Per worker: the objective's pipeline (the teacher, or the model to fine-tune) loads once in float32 on the
CPU (so a student's weights copy from full-precision tensors), the objective builds its trainable module
from it and places it and the frozen networks it keeps (KD: the teacher UNet) on the worker's device; the
text encoder(s) and VAE move there in the training precision (half precision on a GPU; the VAE stays in
float32 where its config asks, as SDXL's does). Trainable weights stay float32 under autocast, wrapped in
DDP by ``ray.train.torch.prepare_model``.

Each optimizer step takes ``gradient_accumulation`` micro-batches (gradients all-reduced only on the
last). Noise, timesteps and VAE samples come from a generator seeded by (seed, step, rank, micro-batch),
and the data stream resumes at the exact batch (distill/data.py), so a run resumed from a checkpoint
takes the same steps as one that never stopped.

Checkpoints (rank 0 writes, every rank reports) hold the trainable weights (``student/``: a diffusers
folder, or LoRA adapters), the EMA weights (``ema/``), the objective's own state (``objective.pt``, when
it has one), the optimizer, LR schedule and loss-scaler state, and the metrics lines up to that step.
``OUTPUT/metrics.jsonl`` is rewritten from the checkpoint's lines when a run resumes, so a step trained
again after a crash is logged once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from typing import Any

from synthmill.distill.data import BadData, ShardStream, StreamSpec, _seed, batch_latents, make_loader
from synthmill.distill.objectives import MicroBatch, build_student, load_pipeline_fp32, objective
from synthmill.sharding import storage

log = logging.getLogger(__name__)

#: Prefix of a training error caused by the input data; the driver turns it into exit code 2.
BAD_DATA = "synthmill-bad-data: "

CKPT_PREFIX = "step_"

#: A checkpoint's file of the objective's own state (Objective.state_dict), when it has one.
OBJECTIVE_STATE = "objective.pt"

__all__ = ["build_student", "encode_text", "load_teacher", "tokenizers", "train_loop"]


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def load_teacher(teacher: Any, storage_options: dict[str, Any] | None):
    """The teacher pipeline in float32 on the CPU (its own safety checker never loads)."""
    return load_pipeline_fp32(teacher, storage_options)


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def tokenizers(pipe: Any) -> list[Any]:
    return [pipe.tokenizer, pipe.tokenizer_2] if is_sdxl(pipe) else [pipe.tokenizer]


def encode_text(pipe: Any, batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """UNet conditioning for a batch: SD 1.x/2.x the text encoder's last hidden state; SDXL both encoders'
    penultimate hidden states concatenated, the pooled projection and the size/crop ``time_ids``."""
    import torch

    if not is_sdxl(pipe):
        return {"encoder_hidden_states": pipe.text_encoder(batch["input_ids"].to(device))[0]}
    states = []
    for enc, key in ((pipe.text_encoder, "input_ids"), (pipe.text_encoder_2, "input_ids_2")):
        out = enc(batch[key].to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    pooled = out[0]
    return {
        "encoder_hidden_states": torch.cat(states, dim=-1),
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device, pooled.dtype)},
    }


class MetricsLog:
    """``OUTPUT/metrics.jsonl``: local files are appended line by line; remote ones rewritten at checkpoints."""

    def __init__(self, output: str, lines: list[str], storage_options: dict[str, Any] | None):
        self.url, self.lines, self.opts = storage.join(output, "metrics.jsonl"), list(lines), storage_options
        self.local = storage.is_local(output)
        self.flush()  # drops lines of steps after the checkpoint we resume from

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        self.lines.append(line)
        if self.local:
            with open(self.url, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def flush(self) -> None:
        storage.write_bytes(self.url, "".join(line + "\n" for line in self.lines).encode(), self.opts)


def _frozen_dtype(mixed_precision: str, device: Any):
    import torch

    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    from synthmill.sharding.nodes import check_node_sees

    check_node_sees(config["node_paths"])  # the teacher, data and output the driver checked
    try:
        _train(config)
    except BadData as e:
        raise RuntimeError(BAD_DATA + str(e)) from None


def _train(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    spec, units, fingerprint = config["spec"], config["units"], config["fingerprint"]
    t, out, opts = spec.train, spec.output.path, spec.storage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(spec.cluster.cpus_per_worker)

    kind = objective(config["objective"])
    pipe = load_pipeline_fp32(kind.model_spec(spec), opts)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    obj = kind(spec, pipe, noise_scheduler)
    module = obj.build()
    frozen = _frozen_dtype(t.mixed_precision, device)
    obj.place(module, device, frozen)
    vae_dtype = torch.float32 if getattr(pipe.vae.config, "force_upcast", False) else frozen
    pipe.vae.to(device, vae_dtype).requires_grad_(False).eval()
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            enc.to(device, frozen).requires_grad_(False).eval()

    step, lines, state, ema = 0, [], None, None
    checkpoint = ray.train.get_checkpoint()
    ckpt_ctx = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)
    with ckpt_ctx as ckpt_dir:
        if ckpt_dir is not None:
            state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location="cpu", weights_only=True)
            if state["fingerprint"] != fingerprint:
                raise RuntimeError(f"checkpoint {ckpt_dir} belongs to another job (fingerprint {state['fingerprint']})")
            step = int(state["step"])
            obj.load_trainable(module, os.path.join(ckpt_dir, "student"))
            with open(os.path.join(ckpt_dir, "metrics.jsonl"), encoding="utf-8") as fh:
                lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
            if t.ema:
                ema = obj.load_ema(os.path.join(ckpt_dir, "ema"), module)
            extra = os.path.join(ckpt_dir, OBJECTIVE_STATE)
            if os.path.exists(extra):
                obj.load_state_dict(torch.load(extra, map_location="cpu", weights_only=True))
            if state.get("world") != world or state.get("loader_workers") != spec.data.loader_workers:
                log.warning("resuming with %s workers x %s loader processes (checkpoint: %s x %s): the data order "
                            "from here differs from an uninterrupted run", world, spec.data.loader_workers,
                            state.get("world"), state.get("loader_workers"))
    if rank == 0:
        log.info("%s (%s): from step %d to %d on %d workers (%s)", spec.kind, kind.name, step, t.max_steps, world,
                 device)

    module.train()
    params = obj.parameters(module)
    if t.gradient_checkpointing:
        module.enable_gradient_checkpointing()
    if t.ema:
        if ema is None:
            ema = obj.new_ema(module, t.ema_decay)
        ema.to(device)
    model = ray.train.torch.prepare_model(module, move_to_device=False)
    obj.bind(model)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    lr_schedule = get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                num_training_steps=t.max_steps)
    amp = device.type == "cuda" and t.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and t.mixed_precision == "fp16")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
    metrics = MetricsLog(out, lines, opts) if rank == 0 else None
    held = {"unet_params": unet_parameters_held()}

    if step >= t.max_steps:
        _report(step, held, None)
        return

    accum, terms = t.gradient_accumulation, kind.terms
    stream = ShardStream(
        StreamSpec(units, spec.data.resolution, spec.data.center_crop, spec.data.random_flip,
                   spec.data.shuffle_buffer, t.batch_size, t.seed, opts, spec.data.max_image_pixels,
                   pipe.vae_scale_factor, pipe.vae.config.latent_channels),
        tokenizers(pipe), rank, world, start_batch=step * accum,
    )
    batches = iter(make_loader(stream, t.batch_size, spec.data.loader_workers))
    scale = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    window_t0, window_samples, window_encoded = time.perf_counter(), 0, 0
    while step < t.max_steps:
        step += 1
        sums = torch.zeros(len(terms), dtype=torch.float64)
        for a in range(accum):
            batch = next(batches)
            gen = torch.Generator(device).manual_seed(_seed(t.seed, "noise", step, rank, a) % (2**63))
            with torch.no_grad():
                latents, encoded = batch_latents(batch, pipe.vae, gen, device, vae_dtype, shift, scale)
                window_encoded += encoded  # stored latents (output.save_latents) skip the VAE
                cond = encode_text(pipe, batch, device)
            sync = contextlib.nullcontext() if a == accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    total, values = obj.loss(MicroBatch(latents, cond, gen, step, a))
                scaler.scale(total / accum).backward()
            sums += torch.tensor([values[k] for k in terms], dtype=torch.float64)
            window_samples += latents.shape[0]
        if t.max_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        lr = lr_schedule.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        if ema is not None:
            ema.step(params)
        obj.after_step(step)

        last = step == t.max_steps
        if step % t.log_every == 0 or last:
            n = len(terms)
            packed = torch.cat([sums / accum, torch.tensor([float(window_samples), float(window_encoded)],
                                                           dtype=torch.float64)])
            if world > 1 and dist.is_initialized():
                dist.all_reduce(packed)  # sum over workers
                packed[:n] /= world
            elapsed = time.perf_counter() - window_t0
            record = {"step": step, **{k: float(packed[i]) for i, k in enumerate(terms)}, "lr": lr,
                      "samples_per_s": round(float(packed[n]) / elapsed, 4) if elapsed > 0 else None,
                      "samples": int((step) * t.batch_size * accum * world), "vae_encoded": int(packed[n + 1])}
            if metrics is not None:
                metrics.add(record)
            window_t0, window_samples, window_encoded = time.perf_counter(), 0, 0
        if step % t.checkpoint_every == 0 or last:
            state = {"fingerprint": fingerprint, "step": step, "world": world,
                     "loader_workers": spec.data.loader_workers, "optimizer": optimizer.state_dict(),
                     "lr_schedule": lr_schedule.state_dict(), "scaler": scaler.state_dict()}
            _report(step, {"step": step, **held}, (obj, module, ema, state, metrics) if rank == 0 else None)


def unet_parameters_held() -> int:
    """Parameters of the UNets alive in this process (each tensor once): what a worker holds besides the
    VAE and text encoders. A fine-tune holds one UNet; KD two (student and teacher)."""
    import gc
    import warnings

    from diffusers import UNet2DConditionModel

    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        # isinstance() on every live object touches torch.distributed's deprecated ``reduce_op``, which warns
        warnings.simplefilter("ignore", FutureWarning)
        unets = [o for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)]
    for o in unets:
        for p in o.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _report(step: int, metrics: dict[str, Any], payload: tuple | None) -> None:
    """Report ``metrics`` for ``step``; rank 0 also hands Ray Train the checkpoint folder."""
    import ray.train
    import torch

    if payload is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_name(step))
        return
    obj, module, ema, state, log_lines = payload
    with tempfile.TemporaryDirectory(prefix="synthmill-ckpt-") as tmp:
        obj.save_trainable(module, os.path.join(tmp, "student"))
        if ema is not None:
            obj.save_ema(ema, os.path.join(tmp, "ema"))
        extra = obj.state_dict()
        if extra is not None:
            torch.save(extra, os.path.join(tmp, OBJECTIVE_STATE))
        torch.save(state, os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "metrics.jsonl"), "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in log_lines.lines))
        if not log_lines.local:
            log_lines.flush()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(step))
