"""The ``kind: finetune`` spec: a pipeline's own UNet (or LoRA adapters on it) trained on the diffusion loss.

It shares every section but the model and ``lora`` with ``kind: distill`` (jobs/distill_spec.py): the data,
training and cluster settings, their checks, and how the fingerprint is taken.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from synthmill.jobs.distill_spec import (
    DataSpec,
    DistillOutputSpec,
    TrainClusterSpec,
    TrainSpec,
    check_training,
    refuse_trained_parts,
    training_basis,
)
from synthmill.jobs.fields import require
from synthmill.jobs.generate_spec import ModelSpec
from synthmill.sharding.storage import REDACTED


@dataclass
class LoraSpec:
    rank: Optional[int] = None  # null: the whole UNet trains; N: peft LoRA adapters of rank N on its attention


@dataclass
class FinetuneTrainSpec(TrainSpec):
    learning_rate: float = 1.0e-4
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (5.0 is the paper's); null: plain MSE
    noise_offset: float = 0.0  # offset noise: this times a per-channel normal draw is added to the noise


#: The fields of a finetune spec that may hold a local path, and how each is read (jobs/spec.resolve_paths).
PATHS = {"model.path": "name_or_path", "model.custom_pipeline": "name_or_path", "data.path": "input",
         "output.path": "output"}


@dataclass
class FinetuneSpec:
    """A finetune job: train a pipeline's UNet (or LoRA adapters on it) on image-text pairs."""

    kind: str = "finetune"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: FinetuneTrainSpec = field(default_factory=FinetuneTrainSpec)
    cluster: TrainClusterSpec = field(default_factory=TrainClusterSpec)
    output: DistillOutputSpec = field(default_factory=DistillOutputSpec)
    storage: Dict[str, Any] = field(default_factory=dict)

    def objective(self) -> str:
        """The row of distill/objectives.OBJECTIVES that trains this job."""
        return "task"

    def check(self) -> None:
        t = self.train
        require(bool(self.model.path.strip()), "model.path", "must not be empty")
        require(not self.model.compile, "model.compile", "is a generate setting; finetune does not compile the model")
        refuse_trained_parts(self.model, "model")
        require(self.lora.rank is None or 1 <= self.lora.rank <= 4096, "lora.rank",
                f"must be null (the whole UNet trains) or in 1..4096, got {self.lora.rank}")
        require(t.snr_gamma is None or 0 < t.snr_gamma < math.inf, "train.snr_gamma",
                f"must be null or > 0 and finite, got {t.snr_gamma}")
        require(0 <= t.noise_offset < math.inf, "train.noise_offset", f"must be >= 0 and finite, got {t.noise_offset}")
        check_training(self.data, t, self.cluster)

    def fingerprint(self) -> str:
        """Hash of what the trained weights depend on (as a distill job's: ``max_steps``, logging and
        checkpoint cadence and the cluster are left out)."""
        return hashlib.sha256(json.dumps(self._fingerprint_basis(), sort_keys=True).encode()).hexdigest()[:16]

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        """As :meth:`DistillSpec.plan_mismatch`."""
        if REDACTED in json.dumps(self._fingerprint_basis()):
            return None
        if plan.get("fingerprint") != self.fingerprint():
            return f'its "fingerprint" is {plan.get("fingerprint")!r}, and these settings give {self.fingerprint()!r}'
        return None

    def _fingerprint_basis(self) -> dict[str, Any]:
        return {"kind": "finetune", **training_basis(self.model, self.data, self.train), "lora": asdict(self.lora)}
