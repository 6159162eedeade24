"""Latent consistency distillation (LCD; Luo et al. 2023): LCM and LCM-LoRA from a frozen teacher UNet.

One step, for clean latents ``z`` with text conditioning ``c``, on the grid of ``num_ddim_timesteps`` DDIM
timesteps ``tau_i = (i + 1) * T / N - 1`` (``T`` training timesteps, ``k = T / N`` apart):

1. draw an index ``i``, noise, and a guidance scale ``w ~ U[w_min, w_max]`` (all from one seeded generator);
   ``x = add_noise(z, noise, tau_i)``;
2. online prediction ``f_online(x, tau_i)``, where the consistency function is
   ``f(x, t) = c_skip(t) * x + c_out(t) * x0(x, t)`` and ``x0`` is the x-prediction the UNet's output gives
   by the scheduler's prediction type; the full LCM student also receives ``w`` through its guidance
   embedding (``timestep_cond``);
3. teacher, without gradients: conditional and unconditional predictions, combined as
   ``cond + w * (cond - uncond)`` (the LCM paper's CFG form: Imagen's scale ``w + 1``) for both ``x0`` and the
   noise, then one DDIM step from ``tau_i`` to ``tau_i - k`` gives ``x_prev``;
4. target, without gradients: ``f_target(x_prev, max(tau_i - k, 0))``;
5. loss: pseudo-Huber ``sqrt((a - b)^2 + c^2) - c`` or mean squared error between the two.

After each optimizer step the target network follows the online one as an exponential moving average
(:func:`update_ema`). LCM-LoRA trains LoRA adapters on the teacher's own UNet: the teacher is that UNet
with its adapters disabled, the target is the online model itself, and there is no guidance embedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from synthmill.models.kd import unwrap

#: Loss kinds of ``lcm.loss``.
LOSSES = ("huber", "l2")

#: The boundary condition's data standard deviation (the LCM paper's sigma_data).
SIGMA_DATA = 0.5

#: Modules that LCM-LoRA adapts (attention projections, feed-forwards, ResNet convolutions, resamplers,
#: the time-embedding projections): the LCM-LoRA training scripts' list.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass(frozen=True)
class LCMConfig:
    """The hyper-parameters of latent consistency distillation (the LCM training scripts' defaults)."""

    w_min: float = 3.0
    w_max: float = 15.0
    num_ddim_timesteps: int = 50
    loss: str = "huber"
    huber_c: float = 0.001
    ema_decay: float = 0.95
    time_cond_proj_dim: int = 256
    timestep_scaling: float = 10.0

    def problems(self, num_train_timesteps: int = 1000) -> list[tuple[str, str]]:
        """(field, what is wrong) for each field that cannot work; empty when all can."""
        out = []
        if not 0 <= self.w_min <= self.w_max:
            out.append(("w_min", f"{self.w_min} and w_max {self.w_max}: need 0 <= w_min <= w_max"))
        if not 1 <= self.num_ddim_timesteps <= num_train_timesteps:
            out.append(("num_ddim_timesteps", f"{self.num_ddim_timesteps}: need 1..{num_train_timesteps} (the "
                                              "teacher's training timesteps)"))
        if self.loss not in LOSSES:
            out.append(("loss", f"{self.loss!r}: one of {', '.join(LOSSES)}"))
        if not 0 < self.huber_c < float("inf"):
            out.append(("huber_c", f"{self.huber_c}: must be > 0 and finite"))
        if not 0 <= self.ema_decay < 1:
            out.append(("ema_decay", f"{self.ema_decay}: need 0 <= ema_decay < 1"))
        if not 2 <= self.time_cond_proj_dim <= 4096:
            out.append(("time_cond_proj_dim", f"{self.time_cond_proj_dim}: need 2..4096"))
        if not 0 < self.timestep_scaling < float("inf"):
            out.append(("timestep_scaling", f"{self.timestep_scaling}: must be > 0 and finite"))
        return out

    def check(self, num_train_timesteps: int = 1000) -> None:
        """Raise ValueError naming the first field that cannot work."""
        for name, message in self.problems(num_train_timesteps):
            raise ValueError(f"{name} {message}")


def _per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[index]`` shaped (batch, 1, 1, ...) to broadcast over a sample of ``ndim`` dimensions."""
    out = values.to(index.device)[index]
    return out.reshape(out.shape[0], *([1] * (ndim - 1)))


class DDIMSolver:
    """The DDIM grid of ``num_ddim_timesteps`` timesteps and the deterministic (eta = 0) DDIM step along it.

    ``timesteps[i] = (i + 1) * (T // N) - 1``, so index ``i`` steps to ``timesteps[i - 1]`` (and index 0 to
    timestep 0, whose ``alphas_cumprod`` the first step's "previous" value is).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        total = acp.shape[0]
        self.step_ratio = total // num_ddim_timesteps
        self.timesteps = (torch.arange(1, num_ddim_timesteps + 1, dtype=torch.float64) * self.step_ratio).round()
        self.timesteps = self.timesteps.long() - 1
        self.alphas_cumprod = acp[self.timesteps].float()
        self.alphas_cumprod_prev = torch.cat([acp[:1], acp[self.timesteps[:-1]]]).float()

    def to(self, device: Any) -> DDIMSolver:
        self.timesteps = self.timesteps.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.alphas_cumprod_prev = self.alphas_cumprod_prev.to(device)
        return self

    def step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` at the previous grid timestep from the predicted clean sample and noise at grid ``index``."""
        prev = _per_sample(self.alphas_cumprod_prev, index, pred_x0.ndim)
        return prev.sqrt() * pred_x0 + (1.0 - prev).sqrt() * pred_noise


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function at discrete ``timesteps``: c_skip(0) = 1, c_out(0) = 0."""
    scaled = timesteps.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales ``w`` (shape (batch,)) as the UNet's ``timestep_cond``.

    ``dim / 2`` frequencies ``10000^(-j / (dim / 2 - 1))`` of ``1000 * w``: sines then cosines, zero-padded to
    an odd ``dim``. Pipelines embed ``guidance_scale - 1`` (the LCM form of ``w``) the same way.
    """
    if w.ndim != 1:
        raise ValueError(f"guidance scales must be one per sample (1-D), got shape {tuple(w.shape)}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)).to(dtype))
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def alphas_sigmas(alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per training timestep, the signal and noise scales ``sqrt(a)`` and ``sqrt(1 - a)``."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    return acp.sqrt(), (1.0 - acp).sqrt()


def predicted_x0(output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, prediction_type: str,
                 alphas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The clean sample a UNet ``output`` at ``timesteps`` predicts, by the scheduler's prediction type."""
    a, s = _per_sample(alphas, timesteps, sample.ndim), _per_sample(sigmas, timesteps, sample.ndim)
    if prediction_type == "epsilon":
        return (sample - s * output) / a
    if prediction_type == "v_prediction":
        return a * sample - s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r}: epsilon, v_prediction or sample")


def predicted_noise(output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, prediction_type: str,
                    alphas: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The noise a UNet ``output`` at ``timesteps`` predicts, by the scheduler's prediction type."""
    a, s = _per_sample(alphas, timesteps, sample.ndim), _per_sample(sigmas, timesteps, sample.ndim)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * sample
    if prediction_type == "sample":
        return (sample - a * output) / s
    raise ValueError(f"prediction_type {prediction_type!r}: epsilon, v_prediction or sample")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Mean pseudo-Huber (``sqrt(d^2 + c^2) - c``) or mean squared error, in float32."""
    d = pred.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(d * d + huber_c**2) - huber_c).mean()
    if kind == "l2":
        return (d * d).mean()
    raise ValueError(f"loss {kind!r}: one of {', '.join(LOSSES)}")


@torch.no_grad()
def update_ema(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * online``, parameter by parameter (same order and shapes)."""
    t_params, o_params = list(unwrap(target).parameters()), list(unwrap(online).parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA target has {len(t_params)} parameters, the online model {len(o_params)}")
    for t, o in zip(t_params, o_params, strict=True):
        t.lerp_(o.detach().to(t.dtype), 1.0 - decay)


def lcm_student(teacher_unet: Any, time_cond_proj_dim: int):
    """The teacher's UNet with a guidance-scale embedding: its own layout and weights, plus the
    ``time_embedding.cond_proj`` projection of ``time_cond_proj_dim`` inputs, initialised to zero so the
    student starts as the teacher exactly. A teacher that already has the embedding is copied as it is. A
    teacher on the meta device gives the layout alone (no weights), on the meta device."""
    from diffusers import UNet2DConditionModel

    base = unwrap(teacher_unet)
    dim = base.config.time_cond_proj_dim or time_cond_proj_dim
    if next(base.parameters()).device.type == "meta":  # a plan: the layout only
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=dim)
    student = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=dim)
    result = student.load_state_dict(base.state_dict(), strict=False)
    missing = set(result.missing_keys) - {"time_embedding.cond_proj.weight"}
    if missing or result.unexpected_keys:
        raise ValueError(f"LCM student: weights that do not copy from the teacher: "
                         f"{sorted(missing | set(result.unexpected_keys))[:3]}")
    if "time_embedding.cond_proj.weight" in result.missing_keys:
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.zero_()
    return student


def target_network(online: Any):
    """A frozen copy of the online UNet (same config and weights), the EMA target of full LCM."""
    from diffusers import UNet2DConditionModel

    base = unwrap(online)
    target = UNet2DConditionModel.from_config(base.config)
    target.load_state_dict(base.state_dict())
    return target.requires_grad_(False)


def add_lora(unet: Any, rank: int, alpha: float | None = None, seed: int = 0) -> list[torch.nn.Parameter]:
    """Add peft LoRA adapters of ``rank`` (``lora_alpha`` = ``alpha``, default ``rank``) to LORA_TARGETS of
    ``unet`` in place; every other weight is frozen. The adapters' random halves come from ``seed`` (the global
    RNG is left as it was); their other halves are zero, so the adapted UNet starts as the plain one.
    Returns the trainable parameters (float32)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: must be >= 1")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def adapters_disabled(unet: Any) -> Iterator[Any]:
    """The UNet with its LoRA adapters off inside the block (the teacher of LCM-LoRA), on again after."""
    base = unwrap(unet)
    base.disable_adapters()
    try:
        yield base
    finally:
        base.enable_adapters()


def lora_layers(unet: Any) -> dict[str, torch.Tensor]:
    """The adapters' weights keyed as peft names them (``...to_q.lora_A.weight``): the layout that
    ``save_lora_weights`` writes and ``load_lora_weights`` maps back onto a plain UNet exactly."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap(unet))


def save_lora(folder: str, unet: Any, pipeline_cls: Any) -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` (float32) as ``pipeline_cls.load_lora_weights`` reads it."""
    import os

    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_layers(unet).items()}
    pipeline_cls.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def zero_conditioning(cond: dict[str, Any]) -> dict[str, Any]:
    """Conditioning of the same shapes with every text tensor zero: SDXL's unconditional input (its pipelines
    use zeros for an empty negative prompt), keeping the size/crop ``time_ids``."""
    out = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    if "added_cond_kwargs" in cond:
        added = dict(cond["added_cond_kwargs"])
        added["text_embeds"] = torch.zeros_like(added["text_embeds"])
        out["added_cond_kwargs"] = added
    return out


def _cast(cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _cast(v, dtype)
        else:
            out[k] = v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    return out


def _cat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: _cat(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


def _expand(cond: dict[str, Any], n: int) -> dict[str, Any]:
    """A batch-1 conditioning repeated to ``n`` samples (others are returned as they are)."""
    def grow(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: grow(x) for k, x in v.items()}
        return v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v

    return grow(cond)


@dataclass
class Draw:
    """The random choices of one LCD step (for a batch of ``b`` samples)."""

    index: torch.Tensor       # (b,) DDIM grid index
    start: torch.Tensor       # (b,) the grid timestep the online model sees
    end: torch.Tensor         # (b,) the timestep the target sees, max(start - k, 0)
    noise: torch.Tensor       # like the latents
    w: torch.Tensor           # (b,) guidance scales (LCM form)


class LCMLoss:
    """The LCD loss for one batch: ``loss(latents, cond, uncond, generator) -> (total, {"loss": float})``.

    ``student`` is the online UNet (may be DDP-wrapped). Full LCM: ``teacher`` and ``target`` are separate
    frozen UNets and the student has a guidance embedding. LCM-LoRA (``lora=True``): ``teacher`` and
    ``target`` are None; the teacher is the student with its adapters disabled and the target the student
    itself, both without gradients. ``cond`` / ``uncond`` are UNet keyword arguments
    (``encoder_hidden_states``, SDXL's ``added_cond_kwargs``); ``uncond`` may have batch size 1.
    """

    def __init__(self, student: Any, teacher: Any, target: Any, alphas_cumprod: torch.Tensor, prediction_type: str,
                 config: LCMConfig, lora: bool = False):
        config.check(len(alphas_cumprod))
        if lora and (teacher is not None or target is not None):
            raise ValueError("LCM-LoRA takes its teacher and target from the student (pass None for both)")
        if not lora and (teacher is None or target is None):
            raise ValueError("LCM needs a teacher and a target network")
        self.student, self.teacher, self.target, self.lora = student, teacher, target, lora
        self.config, self.prediction_type = config, prediction_type
        self.solver = DDIMSolver(alphas_cumprod, config.num_ddim_timesteps)
        self.alphas, self.sigmas = alphas_sigmas(alphas_cumprod)
        self.embed_dim = None if lora else unwrap(student).config.time_cond_proj_dim
        if not lora and self.embed_dim is None:
            raise ValueError("the LCM student has no guidance embedding (time_cond_proj_dim): build it by lcm_student")

    def to(self, device: Any) -> LCMLoss:
        self.solver.to(device)
        self.alphas, self.sigmas = self.alphas.to(device), self.sigmas.to(device)
        return self

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> Draw:
        """Grid index, noise and guidance scale per sample, in that order, from ``generator``."""
        b, c, dev = latents.shape[0], self.config, latents.device
        index = torch.randint(0, c.num_ddim_timesteps, (b,), generator=generator, device=dev)
        noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=torch.float32)
        w = torch.rand((b,), generator=generator, device=dev) * (c.w_max - c.w_min) + c.w_min
        start = self.solver.timesteps.to(dev)[index]
        end = (start - self.solver.step_ratio).clamp(min=0)
        return Draw(index, start, end, noise, w)

    def noisy(self, latents: torch.Tensor, d: Draw) -> torch.Tensor:
        """``sqrt(a_t) * z + sqrt(1 - a_t) * noise`` at the draw's start timesteps (DDPM's ``add_noise``)."""
        a = _per_sample(self.alphas, d.start, latents.ndim)
        s = _per_sample(self.sigmas, d.start, latents.ndim)
        return a * latents.float() + s * d.noise

    def consistency(self, model: Any, x: torch.Tensor, t: torch.Tensor, w_emb: torch.Tensor | None,
                    cond: dict[str, Any]) -> torch.Tensor:
        """``f(x, t) = c_skip(t) * x + c_out(t) * x0``: the consistency function the model defines."""
        out = model(x, t, timestep_cond=w_emb, **cond).sample
        x0 = predicted_x0(out.float(), t, x, self.prediction_type, self.alphas, self.sigmas)
        c_skip, c_out = boundary_scalings(t, self.config.timestep_scaling)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * x0

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, d: Draw, cond: dict[str, Any], uncond: dict[str, Any]) -> torch.Tensor:
        """One DDIM step of the teacher's guided PF-ODE from ``x`` at the start timesteps (no gradients)."""
        b = x.shape[0]
        with adapters_disabled(self.student) if self.lora else contextlib.nullcontext(self.teacher) as teacher:
            dtype = next(teacher.parameters()).dtype
            both = _cast(_cat(cond, _expand(uncond, b)), dtype)
            t2 = torch.cat([d.start, d.start])
            out = teacher(torch.cat([x, x]).to(dtype), t2, **both).sample.float()
        x2 = torch.cat([x, x])
        x0 = predicted_x0(out, t2, x2, self.prediction_type, self.alphas, self.sigmas)
        eps = predicted_noise(out, t2, x2, self.prediction_type, self.alphas, self.sigmas)
        w = d.w.reshape(-1, *([1] * (x.ndim - 1)))
        x0 = x0[:b] + w * (x0[:b] - x0[b:])
        eps = eps[:b] + w * (eps[:b] - eps[b:])
        return self.solver.step(x0, eps, d.index)

    def __call__(self, latents: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any],
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (a graph through the student only) and ``{"loss": float}``."""
        d = self.draw(latents, generator)
        x = self.noisy(latents, d)
        w_emb = None if self.embed_dim is None else guidance_scale_embedding(d.w, self.embed_dim).to(x.device)
        pred = self.consistency(self.student, x, d.start, w_emb, cond)
        x_prev = self.teacher_step(x, d, cond, uncond)
        with torch.no_grad():
            target = unwrap(self.student) if self.lora else self.target
            tgt = self.consistency(target, x_prev, d.end, w_emb, cond)
        loss = consistency_loss(pred, tgt, self.config.loss, self.config.huber_c)
        return loss, {"loss": float(loss.detach())}

    def update_target(self) -> None:
        """The target network's EMA step (after each optimizer step); nothing for LCM-LoRA."""
        if not self.lora:
            update_ema(self.target, self.student, self.config.ema_decay)
