"""The distillation loss: task + output KD + feature KD, with feature taps that stay correct under DDP.

BK-SDM's loss for a student UNet ``s`` and its frozen teacher ``t`` on the same noisy latents:

    L = w_task * MSE(s(x), target) + w_out * MSE(s(x), t(x)) + w_feat * sum_k MSE(s_k(x), t_k(x))

where ``target`` is what the scheduler's ``prediction_type`` asks for (the noise, or v) and ``s_k``,
``t_k`` are the outputs of matching blocks (see :func:`stage_pairs`).

Feature taps are forward hooks on the blocks of the *unwrapped* model, registered once, that record
outputs only inside ``with taps:`` around one forward call. That avoids the known multi-GPU failures
of hook-based feature KD scripts: hooks looked up through the DDP wrapper's names (``module.``
prefix), features kept in a global dict that the next forward (or gradient checkpointing's
recomputation during backward) silently overwrites, and features that outlive the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner



def stage_pairs(student: torch.nn.Module, teacher: torch.nn.Module) -> list[tuple[str, str]]:
    """(student block, teacher block) pairs for feature KD.

    Down blocks match by index (except one whose downsampler the student dropped, as ``bk-tiny``'s
    last down block: its output has another resolution); the mid block if the student has one; up
    blocks are aligned from the output end, so a student missing the lowest-resolution stage (``bk-tiny``)
    matches its up block ``i`` with the teacher's ``i + (teacher up blocks - student up blocks)``.
    """
    s, t = unwrap(student), unwrap(teacher)
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(min(len(s.down_blocks), len(t.down_blocks)))
             if (getattr(s.down_blocks[i], "downsamplers", None) is None)
             == (getattr(t.down_blocks[i], "downsamplers", None) is None)]
    if getattr(s, "mid_block", None) is not None and getattr(t, "mid_block", None) is not None:
        pairs.append(("mid_block", "mid_block"))
    shift = len(t.up_blocks) - len(s.up_blocks)
    if shift < 0:
        raise ValueError(f"the student has more up blocks ({len(s.up_blocks)}) than the teacher ({len(t.up_blocks)})")
    pairs += [(f"up_blocks.{i}", f"up_blocks.{i + shift}") for i in range(len(s.up_blocks))]
    return pairs


class FeatureTaps:
    """Forward hooks on named blocks that record their outputs inside ``with taps:`` only."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        base = unwrap(model)
        modules = dict(base.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no block named {missing[0]!r} in {type(base).__name__}")
        self.features: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not self.active:
                return  # another forward (or checkpoint recomputation in backward): not ours
            if name in self.features:
                raise RuntimeError(f"{name} ran twice in one tapped forward; tap one forward call at a time")
            self.features[name] = output[0] if isinstance(output, tuple) else output

        return record

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.features = {}
        self.active = True
        return self.features

    def __exit__(self, *exc: Any) -> None:
        self.active = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class LossWeights:
    task: float = 1.0
    output_kd: float = 1.0
    feature_kd: float = 1.0


class DistillLoss:
    """Computes the three terms for one batch; holds the taps of both models."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weights: LossWeights):
        self.student, self.teacher, self.weights = student, teacher, weights
        self.pairs = stage_pairs(student, teacher) if weights.feature_kd else []
        self.s_taps = FeatureTaps(student, [p[0] for p in self.pairs])
        self.t_taps = FeatureTaps(teacher, [p[1] for p in self.pairs])

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any],
                 target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (a graph through the student only) and each term as a float."""
        with torch.no_grad(), self.t_taps as t_feats:
            t_out = self.teacher(noisy, timesteps, **cond).sample
        with self.s_taps as s_feats:
            s_out = self.student(noisy, timesteps, **cond).sample
        task = F.mse_loss(s_out.float(), target.float())
        out_kd = F.mse_loss(s_out.float(), t_out.float())
        for a, b in self.pairs:
            if s_feats[a].shape != t_feats[b].shape:
                raise ValueError(f"feature KD: student {a} gives {tuple(s_feats[a].shape)}, teacher {b} gives "
                                 f"{tuple(t_feats[b].shape)}; these blocks do not correspond")
        feat = sum((F.mse_loss(s_feats[a].float(), t_feats[b].float()) for a, b in self.pairs),
                   torch.zeros((), device=s_out.device))
        w = self.weights
        total = w.task * task + w.output_kd * out_kd + w.feature_kd * feat
        terms = {"loss": total, "loss_task": task, "loss_output_kd": out_kd, "loss_feature_kd": feat}
        return total, {k: float(v.detach()) for k, v in terms.items()}
