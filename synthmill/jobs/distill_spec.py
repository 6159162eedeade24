"""The ``kind: distill`` spec: teacher, student layout, data, loss weights, training and cluster settings."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Union

from omegaconf import MISSING

from synthmill.errors import SpecError
from synthmill.jobs.fields import (
    MAX_SEED,
    check_resources,
    one_of,
    require,
    require_count_or_auto,
)
from synthmill.jobs.generate_spec import ModelSpec
from synthmill.sharding.images import MAX_IMAGE_PIXELS
from synthmill.sharding.storage import REDACTED

MIXED_PRECISION = ("no", "fp16", "bf16")
INIT_KEYWORDS = ("teacher", "random")  # student.init values that are not a folder
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TeacherSpec(ModelSpec):
    """The teacher pipeline (hub id or diffusers folder): its UNet teaches, its VAE and text encoders stay frozen."""


@dataclass
class StudentLoraSpec:
    rank: Optional[int] = None  # method lcm: LCM-LoRA, peft adapters of this rank on the teacher's UNet; null: off


@dataclass
class StudentSpec:
    arch: str = MISSING  # bk-base | bk-small | bk-tiny | ssd-1b | vega, a diffusers UNet folder; lcm: teacher
    # teacher: copy weights by the BK-SDM mapping; random: keep the fresh initialisation; else a UNet folder
    # (local or s3://), a pipeline folder, or a previous distill/finetune output, whose weights fit the layout
    init: str = "teacher"
    lora: StudentLoraSpec = field(default_factory=StudentLoraSpec)


#: ``student.arch`` of ``method: lcm``: the teacher's own layout and weights.
TEACHER_ARCH = "teacher"


@dataclass
class LCMSpec:
    """Latent consistency distillation (``method: lcm``); the defaults are the LCM training scripts'."""

    w_min: float = 3.0  # guidance scales drawn uniformly from [w_min, w_max] (LCM form: Imagen's scale - 1)
    w_max: float = 15.0
    num_ddim_timesteps: int = 50  # the DDIM solver's grid (skipping steps of num_train_timesteps / this)
    loss: str = "huber"  # huber (pseudo-Huber, huber_c) | l2
    huber_c: float = 0.001
    ema_decay: float = 0.95  # the target network's EMA (full LCM)
    time_cond_proj_dim: int = 256  # the guidance embedding's width added to the student (full LCM)
    timestep_scaling: float = 10.0  # the boundary condition's c_skip / c_out timestep scaling


@dataclass
class DataSpec:
    """Image-text WebDataset shards: a synthmill generate output, a .tar or glob of tars, or an image folder."""

    path: str = MISSING
    resolution: int = 512  # resize the short side, then centre-crop to resolution x resolution
    center_crop: bool = True  # false: random crop (seeded per sample)
    random_flip: bool = False
    shuffle_buffer: int = 256  # samples held by each reader to shuffle across shard boundaries (0: off)
    loader_workers: int = 2  # torch DataLoader processes per training worker (decode + resize + tokenise)
    samples_per_unit: int = 1000  # image folders only: files per unit of the stream
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are bad input, found from their header (4096 x 4096)


@dataclass
class LossSpec:
    task: float = 1.0  # noise (or v) prediction MSE against the target
    output_kd: float = 1.0  # MSE between student and teacher predictions
    feature_kd: float = 1.0  # sum over stages of MSE between matching block outputs


@dataclass
class TrainSpec:
    max_steps: int = MISSING  # optimizer steps; raise it and run again to train further
    batch_size: int = 64  # per worker per micro-step; global batch = batch_size * gradient_accumulation * workers
    gradient_accumulation: int = 1
    learning_rate: float = 5.0e-5
    lr_schedule: str = "constant"  # constant | constant_with_warmup | linear | cosine
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1.0e-2
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "fp16"  # no | fp16 | bf16; on GPU the frozen models also run in this precision
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    checkpoint_every: int = 1000  # steps; the last step always checkpoints
    checkpoints_kept: int = 2
    log_every: int = 10  # steps between lines of metrics.jsonl (the last step is always logged)
    seed: int = 0  # noise, timesteps, data order and crops all follow from it


@dataclass
class TrainClusterSpec:
    address: Optional[str] = None  # else RAY_ADDRESS, else a local Ray instance
    num_workers: Union[int, str] = "auto"  # auto: one per GPU of the cluster (CPU only: 1)
    use_gpu: Union[bool, str] = "auto"  # auto: when the cluster has GPUs
    cpus_per_worker: int = 1  # on CPU also the worker's torch thread count
    resources: Dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the job fails
    start_timeout_s: float = 1800.0  # fail if the workers cannot all be placed for this long (at each (re)start)


@dataclass
class DistillOutputSpec:
    path: str = MISSING


#: The fields of a distill spec that may hold a local path, and how each is read (jobs/spec.resolve_paths).
PATHS = {"teacher.path": "name_or_path", "teacher.custom_pipeline": "name_or_path",
                                 "student.arch": "arch", "student.init": "init", "data.path": "input",
                                 "output.path": "output"}


@dataclass
class DistillSpec:
    """A distill job: train a smaller student UNet on a teacher's outputs and features."""

    kind: str = "distill"
    method: str = "kd"  # the objective (distill/objectives.py): kd (BK-SDM block-removal KD) | lcm
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    data: DataSpec = field(default_factory=DataSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    lcm: LCMSpec = field(default_factory=LCMSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    cluster: TrainClusterSpec = field(default_factory=TrainClusterSpec)
    output: DistillOutputSpec = field(default_factory=DistillOutputSpec)
    storage: Dict[str, Any] = field(default_factory=dict)

    def objective(self) -> str:
        """The row of distill/objectives.OBJECTIVES that trains this job."""
        return self.method

    def check(self) -> None:
        from synthmill.distill.objectives import methods
        from synthmill.models.students import KNOWN_ARCHS

        d, lo, t, c = self.data, self.loss, self.train, self.cluster
        one_of(self.method, methods("distill"), "method")
        require(bool(self.teacher.path.strip()), "teacher.path", "must not be empty")
        require(not self.teacher.compile, "teacher.compile",
                "is a generate setting; distill does not compile the teacher")
        refuse_trained_parts(self.teacher, "teacher")
        arch = self.student.arch.strip()
        require(bool(arch), "student.arch", f"must name a layout ({', '.join(KNOWN_ARCHS)}) or a UNet folder")
        require(bool(self.student.init.strip()), "student.init",
                f"must be {' or '.join(INIT_KEYWORDS)}, or a UNet folder or earlier output to start from")
        self._check_lcm()
        for name in ("task", "output_kd", "feature_kd"):
            require(0 <= getattr(lo, name) < math.inf, f"loss.{name}",
                    f"must be >= 0 and finite, got {getattr(lo, name)}")
        require(lo.task + lo.output_kd + lo.feature_kd > 0, "loss",
                "at least one of task, output_kd, feature_kd must be > 0")
        check_training(d, t, c)

    def _check_lcm(self) -> None:
        from synthmill.models.lcm import LCMConfig

        rank, lcm = self.student.lora.rank, self.method == "lcm"
        if not lcm:
            require(self.student.arch.strip() != TEACHER_ARCH, "student.arch",
                    f"'{TEACHER_ARCH}' is the student of method lcm; method {self.method} names a smaller layout")
            require(rank is None, "student.lora.rank",
                    f"LoRA students are method lcm's (LCM-LoRA), not {self.method}'s")
            return
        require(self.student.arch.strip() == TEACHER_ARCH, "student.arch",
                f"method lcm distills the teacher into its own layout: use '{TEACHER_ARCH}', got "
                f"{self.student.arch!r}")
        require(self.student.init == "teacher", "student.init",
                "method lcm starts from the teacher's weights: use 'teacher'")
        require(rank is None or 1 <= rank <= 1024, "student.lora.rank", f"must be in 1..1024 or null, got {rank}")
        require(not (self.train.ema and rank is None), "train.ema",
                "full LCM keeps its own EMA target network (lcm.ema_decay) and exports it; train.ema is for "
                "LCM-LoRA's adapters only")
        c = self.lcm
        for name, message in LCMConfig(c.w_min, c.w_max, c.num_ddim_timesteps, c.loss, c.huber_c, c.ema_decay,
                                       c.time_cond_proj_dim, c.timestep_scaling).problems():
            raise SpecError(f"field 'lcm.{name}': {message}")

    def fingerprint(self) -> str:
        """Hash of what the trained weights depend on. ``train.max_steps`` is left out (raise it to train
        further), as are logging and checkpoint cadence and the cluster."""
        return hashlib.sha256(json.dumps(self._fingerprint_basis(), sort_keys=True).encode()).hexdigest()[:16]

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        """How ``plan`` (an output's plan.json) disagrees with this spec (the output's job.yaml), or None: its
        fingerprint must be that of these settings (not compared when job.yaml holds one of them redacted, a
        URL's password). Its ``max_steps`` is not compared: a run that raises it rewrites plan.json just before
        job.yaml."""
        if REDACTED in json.dumps(self._fingerprint_basis()):
            return None
        if plan.get("fingerprint") != self.fingerprint():
            return f'its "fingerprint" is {plan.get("fingerprint")!r}, and these settings give {self.fingerprint()!r}'
        return None

    def _fingerprint_basis(self) -> dict[str, Any]:
        shared = training_basis(self.teacher, self.data, self.train)
        student = asdict(self.student)
        if student["lora"]["rank"] is None:  # outputs from before student.lora keep their fingerprint
            student.pop("lora")
        basis = {"teacher": shared["model"], "student": student, "data": shared["data"],
                 "loss": asdict(self.loss), "train": shared["train"]}
        if self.method != "kd":  # kd's outputs keep the fingerprint they had before there was a choice
            basis["method"] = self.method
        if self.method == "lcm":
            basis["lcm"] = asdict(self.lcm)
            basis.pop("loss")  # kd's weights: not what LCM trains on
        return basis


def refuse_trained_parts(model: Any, section: str) -> None:
    """``unet`` and ``lora`` swap parts into a pipeline that generates; a training kind reads a whole pipeline."""
    require(model.unet is None, f"{section}.unet",
            f"is a generate setting; a training {section} is a whole pipeline folder (export one with the UNet in it)")
    require(not model.lora, f"{section}.lora",
            f"is a generate setting; a training {section} is a whole pipeline folder (fuse the LoRA and export it)")


def check_training(d: DataSpec, t: TrainSpec, c: TrainClusterSpec) -> None:
    """The checks of the sections every training kind shares: data, train, cluster."""
    require(bool(d.path.strip()), "data.path", "must not be empty")
    require(d.resolution >= 8 and d.resolution % 8 == 0, "data.resolution",
            f"must be a positive multiple of 8 (the VAE downsamples by 8), got {d.resolution}")
    require(d.resolution <= 4096, "data.resolution", f"must be <= 4096, got {d.resolution}")
    require(0 <= d.shuffle_buffer <= 100_000, "data.shuffle_buffer",
            f"must be in 0..100000, got {d.shuffle_buffer}")
    require(0 <= d.loader_workers <= 64, "data.loader_workers", f"must be in 0..64, got {d.loader_workers}")
    require(1 <= d.samples_per_unit <= 1_000_000, "data.samples_per_unit",
            f"must be in 1..1000000, got {d.samples_per_unit}")
    require(d.max_image_pixels >= 1, "data.max_image_pixels", f"must be >= 1, got {d.max_image_pixels}")
    require(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    require(1 <= t.batch_size <= 4096, "train.batch_size", f"must be in 1..4096, got {t.batch_size}")
    require(1 <= t.gradient_accumulation <= 1024, "train.gradient_accumulation",
            f"must be in 1..1024, got {t.gradient_accumulation}")
    require(0 < t.learning_rate < 1, "train.learning_rate", f"must be in (0, 1), got {t.learning_rate}")
    one_of(t.lr_schedule, LR_SCHEDULES, "train.lr_schedule")
    require(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0, got {t.lr_warmup_steps}")
    for name in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(t, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
    require(t.adam_weight_decay >= 0, "train.adam_weight_decay", f"must be >= 0, got {t.adam_weight_decay}")
    require(t.adam_epsilon > 0, "train.adam_epsilon", f"must be > 0, got {t.adam_epsilon}")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    one_of(t.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
    require(0 < t.ema_decay < 1, "train.ema_decay", f"must be in (0, 1), got {t.ema_decay}")
    require(t.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {t.checkpoint_every}")
    require(t.checkpoints_kept >= 1, "train.checkpoints_kept", f"must be >= 1, got {t.checkpoints_kept}")
    require(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    require(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in 0..2**63-1, got {t.seed}")
    require_count_or_auto(c.num_workers, "cluster.num_workers")
    if isinstance(c.use_gpu, str):
        require(c.use_gpu == "auto", "cluster.use_gpu", f"must be true, false or 'auto', got {c.use_gpu!r}")
    require(c.cpus_per_worker >= 1, "cluster.cpus_per_worker", f"must be >= 1, got {c.cpus_per_worker}")
    require(c.max_failures >= 0, "cluster.max_failures", f"must be >= 0, got {c.max_failures}")
    require(c.start_timeout_s > 0, "cluster.start_timeout_s", f"must be > 0, got {c.start_timeout_s}")
    check_resources(c.resources, "cluster.cpus_per_worker")


def training_basis(model: Any, data: DataSpec, train: TrainSpec) -> dict[str, Any]:
    """The fingerprint basis of the sections every training kind shares: the loaded model's settings that
    decide the weights, the data as trained on, and the training settings (less ``max_steps``, cadence)."""
    train_d = asdict(train)
    for k in ("max_steps", "checkpoint_every", "checkpoints_kept", "log_every"):
        train_d.pop(k)
    data_d = asdict(data)
    data_d.pop("loader_workers")
    data_d.pop("max_image_pixels")  # a bound on the input, not what is trained on: the jobs that pass it agree
    unused = ("dtype", "scheduler", "safety_checker", "channels_last", "compile", "compile_mode", "unet", "lora",
              "lora_fuse")  # generate settings that training kinds refuse
    return {"model": {k: v for k, v in asdict(model).items() if k not in unused}, "data": data_d, "train": train_d}
