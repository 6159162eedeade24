"""Scheduler override by name: one explicit table of names -> diffusers scheduler classes."""

from __future__ import annotations

from typing import Any

#: spec name -> (diffusers class name, extra config). Classes are imported only when a pipeline loads.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def apply_scheduler(pipe: Any, name: str | None) -> str:
    """Replace ``pipe.scheduler`` by the named one built from the current config; return its class name."""
    if name is not None:
        import diffusers

        cls_name, extra = SCHEDULERS[name]
        cls = getattr(diffusers, cls_name)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return type(pipe.scheduler).__name__
