"""The ``kind: evaluate`` spec: which images, against what, which metrics, computed how."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from synthmill.jobs.fields import ActorClusterSpec, check_cluster, one_of, require
from synthmill.metrics.inception import PROTOCOLS
from synthmill.metrics.registry import METRICS
from synthmill.sharding.images import MAX_IMAGE_PIXELS
from synthmill.sharding.storage import REDACTED


@dataclass
class ImageSetSpec:
    """A synthmill output folder, a tar or glob of tars, or a folder of image files (local or remote)."""

    path: str = MISSING
    samples_per_unit: int = 1000  # image folders: files per unit of work (tars: one unit per tar)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are bad input, found from their header (4096 x 4096)


@dataclass
class ReferenceSpec:
    """Real images to compare with: the same kinds of set, or a stats .npz (mu, sigma) as pytorch-fid writes."""

    path: Optional[str] = None
    samples_per_unit: int = 1000
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass
class FidSpec:
    protocol: str = "pytorch-fid"  # pytorch-fid | clean (see synthmill/metrics/inception.py)
    resize_to: Optional[int] = None  # PIL bicubic to resize_to x resize_to first (BK-SDM: 256); also for IS
    weights: Optional[str] = None  # null: the standard pt_inception-2015-12-05 file; or a path / URL
    weights_sha256: Optional[str] = None  # expected digest (or prefix) of `weights`


@dataclass
class InceptionScoreSpec:
    splits: int = 10
    seed: int = 2020  # torch-fidelity's shuffle seed
    shuffle: bool = True


@dataclass
class ClipSpec:
    model: str = "ViT-g-14"  # open_clip name, hf-hub:org/repo or local-dir:/path
    pretrained: Optional[str] = "laion2b_s34b_b88k"  # tag, or a checkpoint file; ignored for hf-hub:/local-dir:


@dataclass
class KidSpec:
    """torch-fidelity's KID settings, with its names and defaults."""

    subsets: int = 100
    subset_size: int = 1000
    degree: int = 3  # polynomial kernel (gamma x.y + coef0)^degree
    gamma: Optional[float] = None  # null: 1 / feature dimensions
    coef0: float = 1.0
    seed: int = 2020  # numpy RandomState of the subsets


@dataclass
class PrecisionRecallSpec:
    neighborhood: int = 3  # the k of each sample's k-nearest-neighbour ball (torch-fidelity's prc_neighborhood)


@dataclass
class CmmdSpec:
    model: str = "ViT-L-14-336"  # open_clip name, hf-hub:org/repo or local-dir:/path (the paper's: ViT-L/14 at 336)
    pretrained: Optional[str] = "openai"  # tag, or a checkpoint file; ignored for hf-hub:/local-dir:


@dataclass
class HpsSpec:
    version: str = "v2.1"  # v2.0 | v2.1: which release checkpoint `weights: null` is
    weights: Optional[str] = None  # null: the release's checkpoint of `version`; or a path / URL (a {'state_dict'})
    weights_sha256: Optional[str] = None  # expected digest (or prefix) of the weights file
    architecture: str = "ViT-H-14"  # the open_clip model the checkpoint is for; or a JSON file of its config


@dataclass
class ImageRewardSpec:
    weights: Optional[str] = None  # null: the release's ImageReward.pt; or a path / URL
    weights_sha256: Optional[str] = None  # expected digest (or prefix) of the weights file
    med_config: Optional[str] = None  # null: the release's med_config.json (its BERT); or a path / URL
    tokenizer: Optional[str] = None  # null: bert-base-uncased; or a hub id / BERT tokenizer folder (vocab.txt)


@dataclass
class PickScoreSpec:
    model: Optional[str] = None  # null: yuvalkirstain/PickScore_v1; or a hub id / transformers CLIPModel folder
    processor: Optional[str] = None  # null: the release's (laion CLIP-ViT-H-14) for the release's model, else `model`


@dataclass
class CategoriesSpec:
    """Per-category means of the per-sample metrics: each sample's prompt_index picks the row of a prompts file."""

    column: Optional[str] = None  # the column naming each prompt's category (PartiPrompts: Category, Challenge)
    columns: List[str] = field(default_factory=list)  # or several such columns: a table for each, in one job
    path: Optional[str] = None  # the prompts file; null: the one the generate output was made from


@dataclass
class EvalOutputSpec:
    path: str = MISSING


@dataclass
class EvalClusterSpec(ActorClusterSpec):
    batch_size: int = 50  # pytorch-fid's default
    decode_threads: int = 4


#: The fields of a evaluate spec that may hold a local path, and how each is read (jobs/spec.resolve_paths).
PATHS = {"generated.path": "input", "reference.path": "input", "fid.weights": "input",
         "clip.model": "clip", "clip.pretrained": "file_or_name", "categories.path": "input", "output.path": "output",
         "cmmd.model": "clip", "cmmd.pretrained": "file_or_name",
         "hpsv2.weights": "input", "hpsv2.architecture": "name_or_path",
         "pickscore.model": "name_or_path", "pickscore.processor": "name_or_path",
         "image_reward.weights": "input", "image_reward.med_config": "input",
         "image_reward.tokenizer": "name_or_path"}


@dataclass
class EvaluateSpec:
    """An evaluate job: FID / IS / CLIP score of a generated set."""

    kind: str = "evaluate"
    generated: ImageSetSpec = field(default_factory=ImageSetSpec)
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    metrics: List[str] = field(default_factory=lambda: ["fid", "is", "clip"])
    fid: FidSpec = field(default_factory=FidSpec)
    inception_score: InceptionScoreSpec = field(default_factory=InceptionScoreSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)
    kid: KidSpec = field(default_factory=KidSpec)
    precision_recall: PrecisionRecallSpec = field(default_factory=PrecisionRecallSpec)
    cmmd: CmmdSpec = field(default_factory=CmmdSpec)
    hpsv2: HpsSpec = field(default_factory=HpsSpec)
    pickscore: PickScoreSpec = field(default_factory=PickScoreSpec)
    image_reward: ImageRewardSpec = field(default_factory=ImageRewardSpec)
    categories: CategoriesSpec = field(default_factory=CategoriesSpec)
    output: EvalOutputSpec = field(default_factory=EvalOutputSpec)
    cluster: EvalClusterSpec = field(default_factory=EvalClusterSpec)
    storage: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        g, r, f, i, c, cl = self.generated, self.reference, self.fid, self.inception_score, self.clip, self.cluster
        require(bool(g.path.strip()), "generated.path", "must not be empty")
        require(bool(self.metrics), "metrics", f"must name at least one of {', '.join(METRICS)}")
        for k, m in enumerate(self.metrics):
            one_of(m, list(METRICS), f"metrics[{k}]")
        require(len(set(self.metrics)) == len(self.metrics), "metrics", f"lists a metric twice: {self.metrics}")
        for m in self.metrics:
            hint = METRICS[m].reference_hint
            require(not hint or bool(r.path and r.path.strip()), "reference.path", hint or "")
        cat = self.categories
        require(cat.column is None or not cat.columns, "categories.columns", "give column or columns, not both")
        require(len(set(cat.columns)) == len(cat.columns), "categories.columns", f"lists a column twice: {cat.columns}")
        for k, name in enumerate([cat.column] if cat.column is not None else cat.columns):
            where = f"categories.columns[{k}]" if cat.columns else "categories.column"
            require(bool(name.strip()), where, "must not be empty")
        for name, spu in (("generated", g.samples_per_unit), ("reference", r.samples_per_unit)):
            require(1 <= spu <= 1_000_000, f"{name}.samples_per_unit", f"must be in 1..1000000, got {spu}")
        for name, limit in (("generated", g.max_image_pixels), ("reference", r.max_image_pixels)):
            require(limit >= 1, f"{name}.max_image_pixels", f"must be >= 1, got {limit}")
        one_of(f.protocol, sorted(PROTOCOLS), "fid.protocol")
        require(f.resize_to is None or 16 <= f.resize_to <= 4096, "fid.resize_to",
                f"must be in 16..4096 or null, got {f.resize_to}")
        require(f.weights_sha256 is None or bool(re.fullmatch(r"[0-9a-fA-F]{8,64}", f.weights_sha256)),
                "fid.weights_sha256", "must be 8 to 64 hex digits")
        require(1 <= i.splits <= 1000, "inception_score.splits", f"must be in 1..1000, got {i.splits}")
        require(i.seed >= 0, "inception_score.seed", f"must be >= 0, got {i.seed}")
        require(bool(c.model.strip()), "clip.model", "must not be empty")
        k = self.kid
        require(1 <= k.subsets <= 100_000, "kid.subsets", f"must be in 1..100000, got {k.subsets}")
        require(k.subset_size >= 2, "kid.subset_size", f"must be >= 2 (the unbiased MMD), got {k.subset_size}")
        require(1 <= k.degree <= 10, "kid.degree", f"must be in 1..10, got {k.degree}")
        require(k.gamma is None or k.gamma > 0, "kid.gamma", f"must be > 0 or null, got {k.gamma}")
        require(k.seed >= 0, "kid.seed", f"must be >= 0, got {k.seed}")
        nb = self.precision_recall.neighborhood
        require(1 <= nb <= 1000, "precision_recall.neighborhood", f"must be in 1..1000, got {nb}")
        require(bool(self.cmmd.model.strip()), "cmmd.model", "must not be empty")
        h = self.hpsv2
        one_of(h.version, ["v2.0", "v2.1"], "hpsv2.version")
        require(h.weights_sha256 is None or bool(re.fullmatch(r"[0-9a-fA-F]{8,64}", h.weights_sha256)),
                "hpsv2.weights_sha256", "must be 8 to 64 hex digits")
        require(bool(h.architecture.strip()), "hpsv2.architecture", "must not be empty")
        sha = self.image_reward.weights_sha256
        require(sha is None or bool(re.fullmatch(r"[0-9a-fA-F]{8,64}", sha)), "image_reward.weights_sha256",
                "must be 8 to 64 hex digits")
        check_cluster(cl)
        require(1 <= cl.decode_threads <= 64, "cluster.decode_threads", f"must be in 1..64, got {cl.decode_threads}")

    def fingerprint(self, weights_sha256: str | None, networks_sha256: dict[str, str] | None = None) -> str:
        """Hash of what a unit's partial result depends on (the input's identity is in each marker):
        these settings, the Inception weights' digest and the digests of the other networks' weights files
        (``networks_sha256``: network name -> sha256), so a weights file replaced in place is a new job."""
        basis = self._fingerprint_basis(weights_sha256, networks_sha256)
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        """How ``plan`` (an output's plan.json) disagrees with this spec (the output's job.yaml), or None: its
        fingerprint must be that of these settings with the Inception weights it names (``weights_sha256``;
        plans written before it was recorded, and settings job.yaml holds redacted, are not compared)."""
        if "weights_sha256" not in plan:
            return None
        weights, networks = plan["weights_sha256"], plan.get("networks_sha256")
        if REDACTED in json.dumps(self._fingerprint_basis(weights, networks)):
            return None
        fingerprint = self.fingerprint(weights, networks)
        if plan.get("fingerprint") != fingerprint:
            return (f'its "fingerprint" is {plan.get("fingerprint")!r}, and these settings with its weights_sha256 '
                    f'(and networks_sha256) give {fingerprint!r}')
        return None

    def _fingerprint_basis(self, weights_sha256: str | None,
                           networks_sha256: dict[str, str] | None = None) -> dict[str, Any]:
        basis: dict[str, Any] = {
            "metrics": sorted({"fid" if m == "fid_stats" else m for m in self.metrics}),
            "fid": {"protocol": self.fid.protocol, "resize_to": self.fid.resize_to, "weights": weights_sha256},
            "clip": asdict(self.clip) if "clip" in self.metrics else None,
            "batch_size": self.cluster.batch_size,
            "units": [self.generated.samples_per_unit, self.reference.samples_per_unit],
        }
        own = {m: METRICS[m].settings(self) for m in sorted(self.metrics) if METRICS[m].settings}
        if own:  # the settings of metrics that have their own (none of the first four, so their jobs resume)
            basis["settings"] = own
        if networks_sha256:  # only jobs with such networks have it, so jobs of the first four metrics resume
            basis["networks"] = dict(networks_sha256)
        return basis
