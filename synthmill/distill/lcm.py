"""The ``lcm`` row of distill/objectives.OBJECTIVES: latent consistency distillation (``method: lcm``).

Full LCM (``student: {arch: teacher}``): the student is the teacher's UNet with a guidance-scale embedding
(models/lcm.lcm_student); the teacher UNet stays frozen in the training precision, and the EMA target
network (``lcm.ema_decay``) runs under autocast with float32 weights: an average of decay 0.95 kept in
float16 would round away the updates smaller than half a float16 step (at a learning rate of 1e-6, most of
them), and the target would trail the student by hundreds of steps. The
export is the target network in the teacher's pipeline with an ``LCMScheduler``.

LCM-LoRA (``student.lora.rank``): peft adapters on the teacher's own UNet (its base weights frozen in the
training precision) train; the teacher is that UNet with its adapters disabled, the target the online model
itself. The export is ``OUTPUT/pytorch_lora_weights.safetensors`` (``load_lora_weights`` reads it) and
``OUTPUT/pipeline/``, the teacher's pipeline with the adapters fused in and an ``LCMScheduler``.

The math is models/lcm.py's; every random number (grid index, noise, guidance scale) comes from the
micro-batch's generator, so a resumed run draws what an uninterrupted one does. The target network is the
checkpoint's ``objective.pt``.
"""

from __future__ import annotations

import os
from typing import Any

from synthmill.distill.objectives import (
    FullUNet,
    LoraAdapters,
    MicroBatch,
    Objective,
    freeze,
    load_pipeline_fp32,
)


def lcm_config(spec: Any):
    from synthmill.models.lcm import LCMConfig

    c = spec.lcm
    return LCMConfig(w_min=c.w_min, w_max=c.w_max, num_ddim_timesteps=c.num_ddim_timesteps, loss=c.loss,
                     huber_c=c.huber_c, ema_decay=c.ema_decay, time_cond_proj_dim=c.time_cond_proj_dim,
                     timestep_scaling=c.timestep_scaling)


def with_lcm_scheduler(pipe: Any) -> Any:
    """``pipe`` with an ``LCMScheduler`` built from its scheduler's config (the noise schedule carries over)."""
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


class LCMLoraAdapters(LoraAdapters):
    """LoRA adapters of LCM-LoRA: on the LCM-LoRA modules (models/lcm.LORA_TARGETS, convolutions included),
    exported in the layout ``load_lora_weights`` maps back exactly, with a fused pipeline on LCMScheduler."""

    def add(self, unet: Any, seed: int) -> None:
        from synthmill.models.lcm import add_lora

        add_lora(unet, self.rank, seed=seed)

    def export(self, spec: Any, model: Any, checkpoint_dir: str, out_dir: str) -> None:
        from synthmill.models.lcm import save_lora

        pipe = load_pipeline_fp32(model, spec.storage)
        self.add(pipe.unet, 0)
        self.load(pipe.unet, os.path.join(checkpoint_dir, "student"))
        if spec.train.ema:
            self.load_ema(os.path.join(checkpoint_dir, "ema"), pipe.unet).copy_to(self.parameters(pipe.unet))
        save_lora(out_dir, pipe.unet, type(pipe))
        fused = load_pipeline_fp32(model, spec.storage)
        fused.load_lora_weights(out_dir)
        fused.fuse_lora()
        fused.unload_lora_weights()
        with_lcm_scheduler(fused).save_pretrained(os.path.join(out_dir, "pipeline"), safe_serialization=True)


class LCM(Objective):
    """Latent consistency distillation of the teacher into itself: LCM (guidance embedding, EMA target) or
    LCM-LoRA (``student.lora.rank``)."""

    name = "lcm"
    terms = ("loss",)

    @classmethod
    def weights_for(cls, spec: Any) -> FullUNet:
        rank = spec.student.lora.rank
        return LCMLoraAdapters(rank) if rank else FullUNet()

    @classmethod
    def model_spec(cls, spec: Any) -> Any:
        return spec.teacher

    @classmethod
    def plan_student(cls, spec: Any, teacher_unet: Any) -> Any:
        """The student's layout from the teacher's (on the meta device for a plan): the teacher with the
        guidance embedding, or the teacher with LoRA adapters."""
        import torch
        from diffusers import UNet2DConditionModel

        from synthmill.models.lcm import add_lora, lcm_student

        rank = spec.student.lora.rank
        if not rank:
            return lcm_student(teacher_unet, spec.lcm.time_cond_proj_dim)
        with torch.device(next(teacher_unet.parameters()).device):
            adapted = UNet2DConditionModel.from_config(teacher_unet.config)  # the teacher itself stays as it is
        add_lora(adapted, rank)
        return adapted

    @property
    def lora(self) -> bool:
        return isinstance(self.weights, LCMLoraAdapters)

    def build(self) -> Any:
        from synthmill.models.lcm import lcm_student

        if self.lora:
            self.weights.add(self.pipe.unet, self.spec.train.seed)
            return self.pipe.unet
        return lcm_student(self.pipe.unet, self.spec.lcm.time_cond_proj_dim)

    def place(self, module: Any, device: Any, frozen_dtype: Any) -> None:
        from synthmill.models.lcm import target_network

        self.device = device
        self.teacher = self.target = None
        if not self.lora:
            self.teacher = freeze(self.pipe.unet, device, frozen_dtype)
            self.target = target_network(module).to(device).eval()
        super().place(module, device, frozen_dtype)

    def bind(self, model: Any) -> None:
        from synthmill.models.lcm import LCMLoss

        self.model = model
        sched = self.noise_scheduler
        self.loss_fn = LCMLoss(model, self.teacher, self.target, sched.alphas_cumprod, sched.config.prediction_type,
                               lcm_config(self.spec), lora=self.lora).to(self.device)
        self.uncond: dict[str, Any] | None = None

    def unconditional(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The teacher's unconditional input: SDXL's zeros (its pipelines' ``force_zeros_for_empty_prompt``),
        else the text encoding of the empty caption (computed once)."""
        import torch

        from synthmill.models.lcm import zero_conditioning

        if getattr(self.pipe, "text_encoder_2", None) is not None:
            return zero_conditioning(cond)
        if self.uncond is None:
            tok = self.pipe.tokenizer
            ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                self.uncond = {"encoder_hidden_states": self.pipe.text_encoder(ids.to(self.device))[0]}
        return self.uncond

    def loss(self, mb: MicroBatch) -> tuple[Any, dict[str, float]]:
        return self.loss_fn(mb.latents, mb.cond, self.unconditional(mb.cond), mb.generator)

    def after_step(self, step: int) -> None:
        self.loss_fn.update_target()

    def state_dict(self) -> dict[str, Any] | None:
        if self.target is None:
            return None
        return {"target": {k: v.detach().cpu() for k, v in self.target.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state["target"])

    @classmethod
    def export(cls, spec: Any, checkpoint_dir: str, out_dir: str) -> None:
        weights = cls.weights_for(spec)
        if isinstance(weights, LCMLoraAdapters):
            weights.export(spec, spec.teacher, checkpoint_dir, out_dir)
            return
        import torch

        from synthmill.distill.train import OBJECTIVE_STATE
        from synthmill.models.lcm import lcm_student

        pipe = load_pipeline_fp32(spec.teacher, spec.storage)
        unet = lcm_student(pipe.unet, spec.lcm.time_cond_proj_dim)
        state = torch.load(os.path.join(checkpoint_dir, OBJECTIVE_STATE), map_location="cpu", weights_only=True)
        unet.load_state_dict(state["target"])
        pipe.register_modules(unet=unet)
        with_lcm_scheduler(pipe).save_pretrained(os.path.join(out_dir, "pipeline"), safe_serialization=True)
