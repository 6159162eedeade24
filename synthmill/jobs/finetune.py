"""Running a finetune job: the distill runner (jobs/distill.py) with the ``task`` objective.

``prepare`` checks the model folder, its UNet and VAE configs (the UNet on the meta device gives the
parameter counts, and the LoRA adapters' when ``lora.rank`` is set), the resolution, the data and the
output folder, as a distill job's does. ``run`` trains through the same Ray Train loop, checkpoints and
resume, and exports ``OUTPUT/pipeline/`` (plus ``OUTPUT/pytorch_lora_weights.safetensors`` for LoRA).
"""

from __future__ import annotations

from typing import Any

from synthmill.errors import SpecError
from synthmill.jobs import lifecycle
from synthmill.jobs.distill import (  # noqa: F401  (the runner interface: jobs/kinds.py)
    PLAN_KEYS,
    DistillJob,
    Prepared,
    check_plan,
    meta_unet,
    plan_summary,
    prepare_training,
    render_status,
    status,
)
from synthmill.jobs.finetune_spec import FinetuneSpec
from synthmill.sharding import storage


def _lora_parameters(unet: Any, rank: int) -> int:
    """The parameters of rank-``rank`` adapters on the attention projections of a meta-device ``unet``."""
    from synthmill.distill.objectives import LORA_TARGETS

    total = 0
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in LORA_TARGETS) and hasattr(module, "in_features"):
            total += rank * (module.in_features + module.out_features)
    return total


def prepare(spec: FinetuneSpec) -> Prepared:
    """Check every input without loading a model's weights or writing anything."""

    def models(unet_cfg: dict[str, Any]) -> tuple[dict[str, Any], int]:
        from synthmill.models.students import count_parameters

        unet = meta_unet(spec, unet_cfg, "model")
        params = count_parameters(unet)
        rank = spec.lora.rank
        trainable = _lora_parameters(unet, rank) if rank else params
        if rank and not trainable:
            raise SpecError(f"field 'lora.rank': model.path {spec.model.path}'s UNet has no attention projections "
                            "(to_q, to_k, to_v, to_out.0) to put LoRA adapters on")
        return {"model": storage.redact_url(spec.model.path), "lora_rank": rank, "model_params": params,
                "trainable_params": trainable}, len(unet.down_blocks)

    return prepare_training(spec, "model", models)


def ok_line(spec_path: str, plan: dict[str, Any]) -> str:
    samples = plan["data_samples"] if plan["data_samples"] is not None else "?"
    what = f"LoRA rank {plan['lora_rank']}" if plan["lora_rank"] else "all weights"
    return (f"ok: {spec_path}: fine-tune {plan['model']} ({plan['model_params'] / 1e6:.1f}M; {what}, "
            f"{plan['trainable_params'] / 1e6:.2f}M trained) on {samples} samples in {plan['data_units']} units at "
            f"{plan['resolution']}px; step {plan['steps_done']} of {plan['max_steps']}")


def done_line(summary: dict[str, Any], output: str) -> str:
    loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
    rate = f"{summary['samples_per_s']:.2f} samples/s" if summary["samples_per_s"] else "no steady-state rate"
    what = f"LoRA rank {summary['lora_rank']}" if summary.get("lora_rank") else "all weights"
    return (f"done: {summary['model']} fine-tuned ({what}) at step {summary['steps']} ({summary['steps_run']} steps "
            f"run, {summary['steps_resumed']} resumed; {rate} on {summary['workers']} {summary['device']} workers; "
            f"loss {loss}) -> {summary['pipeline']}")


def run(p: Prepared) -> dict[str, Any]:
    """Train to ``train.max_steps`` (resuming), export the pipeline (and LoRA weights), write the summary."""
    return lifecycle.run(DistillJob(p))
