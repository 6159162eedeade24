"""The table of training objectives: what a training worker trains, and on what loss.

The training loop (:mod:`synthmill.distill.train`) is one for every objective: the data stream, VAE
encoding, text encoding, optimizer, LR schedule, loss scaler, gradient accumulation, EMA, checkpoints with
exact resume, ``metrics.jsonl`` and the export of ``OUTPUT/pipeline/``. What differs is a row of
:data:`OBJECTIVES`: a name (``distill``'s ``method``, or the objective a job kind uses) and the class that
implements :class:`Objective`. A new objective is one class plus one row.

Rows
    ``kd``
        BK-SDM block-removal knowledge distillation (``kind: distill``, ``method: kd``): the student is cut
        from the teacher (``student.arch`` / ``student.init``), the teacher UNet stays frozen on the device,
        the loss is :class:`synthmill.models.kd.DistillLoss`.
    ``task``
        The diffusion task loss alone (``kind: finetune``): the model's own UNet trains (all of it, or
        peft LoRA adapters on it), no other UNet is held.
    ``lcm``
        Latent consistency distillation (``method: lcm``; :mod:`synthmill.distill.lcm`): the teacher's own
        UNet with a guidance embedding and an EMA target network, or LCM-LoRA adapters on it.

The interface, in the order the worker calls it (``spec`` is the job's spec dataclass, ``pipe`` the
pipeline that :meth:`Objective.model_spec` names, loaded in float32 on the CPU):

``cls.model_spec(spec) -> ModelSpec``
    The pipeline the workers load and the export builds on (the teacher for KD, the model for a fine-tune).
    Its VAE and text encoders are frozen by the loop; its scheduler config gives the noise schedule.
``Objective(spec, pipe, noise_scheduler)``
    No weights move yet.
``build() -> torch.nn.Module``
    The trainable module in float32 on the CPU (for KD a new student; for a fine-tune ``pipe.unet`` itself).
    Seeded from ``spec.train.seed`` where it draws anything.
From here on, methods default to the row's weight handling, ``weights_for(spec)``: :class:`FullUNet` (a
whole UNet trains, checkpointed as a diffusers folder) or :class:`LoraAdapters` (peft adapters on a frozen
UNet, exported in diffusers' LoRA format); a row overrides what it needs.

``place(module, device, frozen_dtype) -> None``
    Move the trainable module, and the frozen networks this objective keeps besides the VAE and text
    encoders (KD: the teacher UNet), to ``device``. Frozen networks go in ``frozen_dtype`` with
    ``requires_grad_(False)`` and ``eval()``; trainable parameters stay float32.
``parameters(module) -> list[Parameter]``
    What the optimizer, gradient clipping and EMA see (default: every parameter; LoRA: the adapters).
``load_trainable(module, folder)`` / ``save_trainable(module, folder)``
    The trainable weights in a checkpoint's ``student/`` folder, restored exactly (after ``place``).
``new_ema(module, decay)``, ``save_ema(ema, folder)``, ``load_ema(folder, module)``
    ``train.ema``: a ``diffusers.training_utils.EMAModel`` of :meth:`parameters`, kept in ``ema/``.
``bind(model)``
    ``model`` is the module wrapped for DDP (``ray.train.torch.prepare_model``); forward through it.
``loss(mb: MicroBatch) -> (total, {term: float})``
    The loss of one micro-batch (a graph through the trainable module) and each of :attr:`terms` as a
    float. ``mb.latents`` are clean latents (scaled, float32), ``mb.cond`` the UNet's conditioning keyword
    arguments, ``mb.generator`` a generator seeded by (seed, step, rank, micro-batch) that the VAE has drawn
    from already: draw noise, timesteps, guidance scales from it and nothing else, so a resumed run draws
    the same numbers.
``after_step(step)``
    After each optimizer step (and the EMA update): e.g. LCM's EMA target network.
``state_dict() -> dict | None`` / ``load_state_dict(state)``
    Extra state that a checkpoint keeps as ``objective.pt`` (``torch.save``; tensors and plain data).
``cls.export(spec, checkpoint_dir, out_dir)`` (on the driver, no worker state; default: the weights')
    Write into the local folder ``out_dir``: ``pipeline/`` (a diffusers pipeline folder that
    ``DiffusionPipeline.from_pretrained`` loads) and any other files of the output (LoRA:
    ``pytorch_lora_weights.safetensors``, which diffusers' ``load_lora_weights(OUTPUT)`` reads). The
    caller moves them into ``output.path``, the pipeline's ``model_index.json`` last.

:attr:`Objective.terms` are the ``metrics.jsonl`` keys of the loss, the total ``loss`` first; the loop
logs their means over micro-batches and workers. KD's are ``loss``, ``loss_task``, ``loss_output_kd``,
``loss_feature_kd``.

Adding a row (e.g. ``lcm``): a class here or in a module of the ``distill`` layer (its loss math may live
in ``synthmill/models/``), one :class:`ObjectiveRow` in :data:`OBJECTIVES` (``kind="distill"`` makes it a
value of ``method``), and the spec fields it reads. The job runner passes ``spec.objective()`` to the
workers and exports through the row, so neither the loop nor the runner changes. The workers report the
parameters of the UNets they hold (``summary.json``'s ``worker_unet_params``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass
class MicroBatch:
    latents: torch.Tensor  # clean latents, scaled by the VAE's factor (and shift), float32
    cond: dict[str, Any]  # the UNet's conditioning: encoder_hidden_states (+ added_cond_kwargs for SDXL)
    generator: torch.Generator  # seeded per (seed, step, rank, micro-batch); the VAE sample drew first
    step: int  # the optimizer step being taken (1-based)
    micro: int  # the micro-batch within the step (0 .. gradient_accumulation - 1)


def noisy_latents(noise_scheduler: Any, mb: MicroBatch, noise_offset: float = 0.0):
    """(noisy latents, timesteps, target) for the diffusion task loss: noise (with ``noise_offset``, as
    diffusers' text-to-image script adds it), timesteps uniform over the training schedule, and the target
    the scheduler's ``prediction_type`` asks for (the noise, or v)."""
    import torch

    latents, gen = mb.latents, mb.generator
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen,
                                                   device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                              device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return noisy, timesteps, target


def freeze(module: Any, device: Any, dtype: Any) -> Any:
    return module.to(device, dtype).requires_grad_(False).eval()


class FullUNet:
    """How a whole trainable UNet is placed, checkpointed (a diffusers folder), averaged and exported."""

    def place(self, module: Any, device: Any, frozen_dtype: Any) -> None:
        module.to(device)

    def parameters(self, module: Any) -> list[Any]:
        return list(module.parameters())

    def save(self, module: Any, folder: str) -> None:
        module.save_pretrained(folder, safe_serialization=True)

    def load(self, module: Any, folder: str) -> None:
        from diffusers import UNet2DConditionModel

        loaded = UNet2DConditionModel.from_pretrained(folder)
        module.load_state_dict(loaded.state_dict())

    def new_ema(self, module: Any, decay: float) -> Any:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        return EMAModel(module.parameters(), decay=decay, model_cls=UNet2DConditionModel, model_config=module.config)

    def save_ema(self, ema: Any, folder: str) -> None:
        ema.save_pretrained(folder)

    def load_ema(self, folder: str, module: Any) -> Any:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        return EMAModel.from_pretrained(folder, UNet2DConditionModel)

    def export(self, spec: Any, model: Any, checkpoint_dir: str, out_dir: str) -> None:
        """``out_dir/pipeline``: the pipeline of ``model`` with the trained UNet (EMA weights when trained
        with EMA)."""
        from diffusers import UNet2DConditionModel

        weights = os.path.join(checkpoint_dir, "ema" if spec.train.ema else "student")
        unet = UNet2DConditionModel.from_pretrained(weights)  # an EMA folder's config also holds its state: ignored
        pipe = load_pipeline_fp32(model, spec.storage)
        pipe.register_modules(unet=unet)
        pipe.save_pretrained(os.path.join(out_dir, "pipeline"), safe_serialization=True)


class Objective:
    """The base of every row. Its weight handling (place, parameters, checkpoint, EMA, export) is delegated
    to :attr:`weights`: :class:`FullUNet` (a whole UNet trains) or :class:`LoraAdapters` (peft adapters on a
    frozen UNet); a row picks one in ``weights_for`` and overrides what it needs."""

    name: ClassVar[str] = ""
    terms: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, spec: Any, pipe: Any, noise_scheduler: Any):
        self.spec, self.pipe, self.noise_scheduler = spec, pipe, noise_scheduler
        self.weights = self.weights_for(spec)
        self.model: Any = None

    @classmethod
    def weights_for(cls, spec: Any) -> FullUNet:
        return FullUNet()

    @classmethod
    def model_spec(cls, spec: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def plan_student(cls, spec: Any, teacher_unet: Any) -> Any:
        """A distill method's student built from ``teacher_unet`` (on the meta device when the driver plans:
        layout and parameter count only). Raises ValueError when the spec's student does not fit it."""
        raise NotImplementedError

    def build(self) -> Any:
        raise NotImplementedError

    def place(self, module: Any, device: Any, frozen_dtype: Any) -> None:
        self.weights.place(module, device, frozen_dtype)

    def parameters(self, module: Any) -> list[Any]:
        return self.weights.parameters(module)

    def save_trainable(self, module: Any, folder: str) -> None:
        self.weights.save(module, folder)

    def load_trainable(self, module: Any, folder: str) -> None:
        self.weights.load(module, folder)

    def new_ema(self, module: Any, decay: float) -> Any:
        return self.weights.new_ema(module, decay)

    def save_ema(self, ema: Any, folder: str) -> None:
        self.weights.save_ema(ema, folder)

    def load_ema(self, folder: str, module: Any) -> Any:
        return self.weights.load_ema(folder, module)

    def bind(self, model: Any) -> None:
        self.model = model

    def loss(self, mb: MicroBatch) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @classmethod
    def export(cls, spec: Any, checkpoint_dir: str, out_dir: str) -> None:
        cls.weights_for(spec).export(spec, cls.model_spec(spec), checkpoint_dir, out_dir)


def load_pipeline_fp32(model: Any, storage_options: dict[str, Any] | None) -> Any:
    """The pipeline of ``model`` in float32 on the CPU (its own safety checker never loads)."""
    import dataclasses

    from synthmill.models.loading import load_pipeline

    spec = dataclasses.replace(model, dtype="float32", safety_checker=False, scheduler=None)
    return load_pipeline(spec, "cpu", storage_options)


# ---- kd: BK-SDM knowledge distillation -------------------------------------------------------------------


def build_student(spec: Any, teacher_unet: Any):
    """The student of ``student.arch``: weights copied from the teacher (``init: teacher``), freshly initialised
    (``random``), or loaded from the UNet folder ``student.init`` names (the driver checked that they fit)."""
    from diffusers import UNet2DConditionModel

    from synthmill.models.students import make_student, student_config

    init = spec.student.init
    if init == "teacher":
        return make_student(teacher_unet, spec.student.arch)
    import torch

    torch.manual_seed(spec.train.seed)
    student = UNet2DConditionModel.from_config(student_config(teacher_unet, spec.student.arch))
    if init == "random":
        return student
    from synthmill.models.fetch import local_model_path
    from synthmill.sharding import storage

    folder = storage.path_of(init) if storage.is_local(init) else local_model_path(init, spec.storage)
    loaded = UNet2DConditionModel.from_pretrained(folder)  # an EMA folder's config also holds its state: ignored
    student.load_state_dict(loaded.state_dict(), strict=True)
    return student


class KD(Objective):
    """Task + output KD + feature KD between a student cut from the teacher and the frozen teacher UNet."""

    name = "kd"
    terms = ("loss", "loss_task", "loss_output_kd", "loss_feature_kd")

    @classmethod
    def model_spec(cls, spec: Any) -> Any:
        return spec.teacher

    @classmethod
    def plan_student(cls, spec: Any, teacher_unet: Any) -> Any:
        from synthmill.models.students import make_student

        return make_student(teacher_unet, spec.student.arch)

    def build(self) -> Any:
        return build_student(self.spec, self.pipe.unet)

    def place(self, module: Any, device: Any, frozen_dtype: Any) -> None:
        self.teacher = freeze(self.pipe.unet, device, frozen_dtype)
        super().place(module, device, frozen_dtype)

    def bind(self, model: Any) -> None:
        from synthmill.models.kd import DistillLoss, LossWeights

        lo = self.spec.loss
        self.model = model
        self.loss_fn = DistillLoss(model, self.teacher, LossWeights(lo.task, lo.output_kd, lo.feature_kd))

    def loss(self, mb: MicroBatch) -> tuple[Any, dict[str, float]]:
        noisy, timesteps, target = noisy_latents(self.noise_scheduler, mb)
        return self.loss_fn(noisy, timesteps, mb.cond, target)


# ---- task: the diffusion loss alone (fine-tuning), full weights or LoRA -----------------------------------

#: The attention projections that LoRA adapters wrap (as diffusers' text-to-image LoRA script does).
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: The file diffusers' ``save_lora_weights`` writes and ``load_lora_weights(folder)`` reads.
LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_FILE = "adapter.safetensors"  # a checkpoint's student/: peft's state dict of the adapters
LORA_EMA_FILE = "lora_ema.pt"  # a checkpoint's ema/: the EMAModel state of the adapters


class LoraAdapters(FullUNet):
    """Trainable LoRA adapters of ``rank`` on a frozen UNet: the base weights are frozen (in the frozen
    precision on a GPU), the adapters train in float32; checkpoints keep the adapters only; the export
    writes ``pytorch_lora_weights.safetensors`` and the pipeline with the adapters fused into its UNet."""

    def __init__(self, rank: int):
        self.rank = rank

    def add(self, unet: Any, seed: int) -> None:
        """peft adapters (alpha = rank: scale 1, which is how a weights file without alphas loads) on the
        attention projections of ``unet``, whose own weights freeze. Seeded: the adapters' initial weights
        are drawn."""
        import torch
        from peft import LoraConfig

        unet.requires_grad_(False)
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))

    def place(self, module: Any, device: Any, frozen_dtype: Any) -> None:
        module.to(device)
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)

    def parameters(self, module: Any) -> list[Any]:
        return [p for p in module.parameters() if p.requires_grad]

    def save(self, module: Any, folder: str) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(module).items()}
        save_file(state, os.path.join(folder, ADAPTER_FILE))

    def load(self, module: Any, folder: str) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(module, load_file(os.path.join(folder, ADAPTER_FILE)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{folder}: adapter weights this model has no place for: {unexpected[:3]}")

    def new_ema(self, module: Any, decay: float) -> Any:
        from diffusers.training_utils import EMAModel

        return EMAModel(self.parameters(module), decay=decay)

    def save_ema(self, ema: Any, folder: str) -> None:
        import torch

        os.makedirs(folder, exist_ok=True)
        torch.save(ema.state_dict(), os.path.join(folder, LORA_EMA_FILE))

    def load_ema(self, folder: str, module: Any) -> Any:
        import torch

        ema = self.new_ema(module, 0.5)  # the decay and the rest come from the saved state
        ema.load_state_dict(torch.load(os.path.join(folder, LORA_EMA_FILE), map_location="cpu", weights_only=True))
        return ema

    def export(self, spec: Any, model: Any, checkpoint_dir: str, out_dir: str) -> None:
        """``out_dir/pytorch_lora_weights.safetensors`` (diffusers' LoRA format, from the EMA weights when
        trained with EMA) and ``out_dir/pipeline`` (the pipeline of ``model`` with them fused into its UNet)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        pipe = load_pipeline_fp32(model, spec.storage)
        self.add(pipe.unet, 0)
        self.load(pipe.unet, os.path.join(checkpoint_dir, "student"))
        if spec.train.ema:
            self.load_ema(os.path.join(checkpoint_dir, "ema"), pipe.unet).copy_to(self.parameters(pipe.unet))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        type(pipe).save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
        fused = load_pipeline_fp32(model, spec.storage)
        fused.load_lora_weights(out_dir)
        fused.fuse_lora()
        fused.unload_lora_weights()
        fused.save_pretrained(os.path.join(out_dir, "pipeline"), safe_serialization=True)


class Task(Objective):
    """The diffusion task loss alone (noise or v by the scheduler's ``prediction_type``; min-SNR weighting
    with ``train.snr_gamma``, offset noise with ``train.noise_offset``) on the model's own UNet, or on peft
    LoRA adapters on it (``lora.rank``). No other UNet is loaded."""

    name = "task"
    terms = ("loss",)

    @classmethod
    def weights_for(cls, spec: Any) -> FullUNet:
        rank = spec.lora.rank
        return LoraAdapters(rank) if rank else FullUNet()

    @classmethod
    def model_spec(cls, spec: Any) -> Any:
        return spec.model

    def build(self) -> Any:
        unet = self.pipe.unet
        if isinstance(self.weights, LoraAdapters):
            self.weights.add(unet, self.spec.train.seed)
        return unet

    def loss(self, mb: MicroBatch) -> tuple[Any, dict[str, float]]:
        import torch.nn.functional as F

        t = self.spec.train
        noisy, timesteps, target = noisy_latents(self.noise_scheduler, mb, t.noise_offset)
        pred = self.model(noisy, timesteps, **mb.cond).sample
        if t.snr_gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            loss = min_snr_loss(self.noise_scheduler, pred, target, timesteps, t.snr_gamma)
        return loss, {"loss": float(loss.detach())}


def min_snr_loss(noise_scheduler: Any, pred: Any, target: Any, timesteps: Any, gamma: float) -> Any:
    """Min-SNR-gamma weighted MSE (Hang et al. 2023), weighted per sample as diffusers' text-to-image script
    does: min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for v prediction."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    else:
        weights = weights / snr
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


# ---- the table -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveRow:
    name: str
    kind: str  # the job kind that uses it: "distill" (a `method`) or "finetune"
    target: str  # "module:Class", imported only when a job trains with it

    def load(self) -> type[Objective]:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


OBJECTIVES: dict[str, ObjectiveRow] = {r.name: r for r in (
    ObjectiveRow("kd", "distill", "synthmill.distill.objectives:KD"),
    ObjectiveRow("task", "finetune", "synthmill.distill.objectives:Task"),
    ObjectiveRow("lcm", "distill", "synthmill.distill.lcm:LCM"),
)}


def methods(kind: str) -> tuple[str, ...]:
    """The objectives a job kind may name (``distill``'s ``method``)."""
    return tuple(r.name for r in OBJECTIVES.values() if r.kind == kind)


def objective(name: str) -> type[Objective]:
    return OBJECTIVES[name].load()
