"""The ``kind: generate`` spec (docs/design.md, "Job specs" -> "Generate"): typed sections and their checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from synthmill.errors import SpecError
from synthmill.jobs.fields import MAX_SEED, ActorClusterSpec, check_cluster, one_of, require
from synthmill.models.schedulers import SCHEDULERS
from synthmill.sharding.encoders import ENCODERS
from synthmill.sharding.plan import count, earlier_parts, plan_problem
from synthmill.sharding.rows import META_FIELDS, PER_ROW_SETTINGS, check_size
from synthmill.sharding.storage import REDACTED

DTYPES = ("auto", "float16", "bfloat16", "float32")
RESUME_CHECKS = ("size", "sha256")


@dataclass
class LoraSpec:
    """One LoRA to load into the pipeline (diffusers' ``load_lora_weights``)."""

    path: str = MISSING  # a .safetensors file, or a folder holding pytorch_lora_weights.safetensors (local or s3://)
    scale: float = 1.0  # its adapter weight (diffusers' set_adapters)


@dataclass
class UnetSpec:
    """``model.unet`` as a section: where the UNet is, as diffusers' ``UNet2DConditionModel.from_pretrained(path,
    subfolder=..., revision=...)`` takes it. A plain string is ``{path: STRING}``."""

    path: str = MISSING  # a folder (local or s3://) or a hub id
    subfolder: Optional[str] = None  # the UNet's folder inside it, e.g. unet for a pipeline folder or repo
    revision: Optional[str] = None  # a hub id's branch, tag or commit (null: main)

    def __str__(self) -> str:
        """The path, and the subfolder and revision where given: how messages name it."""
        given = [f"{k} {getattr(self, k)}" for k in ("subfolder", "revision") if getattr(self, k) is not None]
        return f"{self.path} ({', '.join(given)})" if given else self.path


UNET_KEYS = tuple(f.name for f in fields(UnetSpec))


@dataclass
class ModelSpec:
    """Which diffusers pipeline to load, and how."""

    path: str = MISSING  # hub id or diffusers folder
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU
    scheduler: Optional[str] = None  # override by name (models/schedulers.py)
    variant: Optional[str] = None  # weight file variant, e.g. fp16
    revision: Optional[str] = None
    safety_checker: bool = True  # keep the pipeline's own safety checker, if it has one
    allow_pickle: bool = False  # also load .bin/.ckpt weights (pickle can run code)
    trust_remote_code: bool = False  # needed for custom_pipeline
    custom_pipeline: Optional[str] = None
    # Speed settings (models/loading.py, optimize_pipeline). They may change the last bits of fp16
    # images, so they enter the fingerprint once set away from their defaults.
    channels_last: Optional[bool] = None  # UNet and VAE in channels-last memory format; null = on CUDA only
    compile: bool = False  # torch.compile the UNet and the VAE decoder (the first batches pay the compile)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    # Trained parts (models/loading.py, load_parts): their files' identities are recorded in plan.json as the
    # model folder's are, and checked on every rerun.
    # A UNet used in place of the pipeline's own: a diffusers UNet folder (local or s3://) or hub id whose root is
    # the UNet, or a UnetSpec section {path, subfolder, revision}. Typed Any so that both forms load; a string or a
    # section of UnetSpec's keys becomes a UnetSpec (__post_init__), anything else is refused by check().
    unet: Any = None
    lora: List[LoraSpec] = field(default_factory=list)  # LoRA weights loaded on top, each with its scale
    lora_fuse: bool = False  # fuse the LoRAs into the weights (faster sampling; images may differ in the last bits)

    def __post_init__(self) -> None:
        u = self.unet
        if isinstance(u, str):
            self.unet = UnetSpec(path=u)
        elif isinstance(u, dict) and set(u) <= set(UNET_KEYS) and all(isinstance(k, str) for k in u):
            self.unet = UnetSpec(**u)


def check_unet_section(unet: Any, name: str) -> None:
    """``model.unet`` after loading: None or a :class:`UnetSpec` with a path and, if given, a plain relative
    subfolder and a revision. SpecError naming the field."""
    if unet is None:
        return
    if isinstance(unet, dict):
        bad = next((k for k in unet if k not in UNET_KEYS), None)
        raise SpecError(f"unknown key '{name}.{bad}' (known keys here: {', '.join(UNET_KEYS)})")
    require(isinstance(unet, UnetSpec), name,
            f"must be a UNet folder or hub id, or a section ({', '.join(UNET_KEYS)}), got {unet!r}")
    for key in UNET_KEYS:
        value = getattr(unet, key)
        require(value is None or isinstance(value, str), f"{name}.{key}", f"must be a string, got {value!r}")
    require(unet.path != MISSING, f"{name}.path", "is required (a UNet folder or hub id)")
    require(bool(unet.path.strip()), name if unet.subfolder is None else f"{name}.path", "must not be empty (or null)")
    sub = unet.subfolder
    if sub is not None:
        parts = sub.strip("/").split("/")
        require(bool(sub.strip()) and not sub.startswith("/") and ".." not in parts and "" not in parts,
                f"{name}.subfolder", f"must be a folder inside {name}.path, such as unet, got {sub!r}")
    require(unet.revision is None or bool(unet.revision.strip()), f"{name}.revision", "must not be empty (or null)")


#: Model settings added after outputs existed: they join the fingerprint only when not at these defaults,
#: so a job written before they existed still resumes.
_LATE_MODEL_KEYS = {"channels_last": None, "compile": False, "compile_mode": "default", "unet": None, "lora": [],
                    "lora_fuse": False}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class PromptsSpec:
    """Where prompts come from: one row per prompt."""

    path: str = MISSING  # .txt | .jsonl | .csv | .tsv | .parquet
    column: str = "caption"  # for tabular sources (ignored for .txt)
    limit: Optional[int] = None  # use only the first `limit` rows
    keep: List[str] = field(default_factory=list)  # columns carried into each sample's json and the index
    per_row: Dict[str, str] = field(default_factory=dict)  # setting -> column that overrides it per row


@dataclass
class SamplingSpec:
    """Diffusion sampling settings, the same for every sample."""

    steps: int = 25
    guidance_scale: float = 7.5
    height: Optional[int] = None  # 512 unless sizes is given
    width: Optional[int] = None
    sizes: Optional[List[List[int]]] = None  # [[height, width], ...]: row i gets sizes[i % len(sizes)]
    negative_prompt: Optional[str] = None
    seed: int = 0  # sample i gets seed + i
    images_per_prompt: int = 1


@dataclass
class OutputSpec:
    """Where and how shards are written."""

    path: str = MISSING
    format: str = "png"  # png | jpg | webp
    quality: int = 95  # jpg / webp quality
    samples_per_shard: int = 1000
    resume_check: str = "size"  # size | sha256: how a committed tar is checked against its marker
    save_latents: bool = False  # also store each sample's final latents (KEY.latents.npy, float16)


@dataclass
class ClusterSpec(ActorClusterSpec):
    """Ray: which cluster, how many actors, and how work flows to them."""

    encode_threads: int = 4


#: The fields of a generate spec that may hold a local path, and how each is read (jobs/spec.resolve_paths).
PATHS = {"model.path": "name_or_path", "model.custom_pipeline": "name_or_path", "model.unet.path": "name_or_path",
         "model.lora.*.path": "input", "prompts.path": "input", "output.path": "output"}


@dataclass
class GenerateSpec:
    """A generate job: prompts -> images -> WebDataset shards."""

    kind: str = "generate"
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    # fsspec storage options for every remote URL (e.g. endpoint_url); credentials normally come from
    # the standard AWS environment variables. Secret values never reach job.yaml or messages.
    storage: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Ranges and cross-field rules; raises SpecError naming the field."""
        m, p, s, o, c = self.model, self.prompts, self.sampling, self.output, self.cluster
        require(bool(m.path.strip()), "model.path", "must not be empty")
        one_of(m.dtype, DTYPES, "model.dtype")
        if m.scheduler is not None:
            one_of(m.scheduler, sorted(SCHEDULERS), "model.scheduler")
        one_of(m.compile_mode, COMPILE_MODES, "model.compile_mode")
        require(
            m.custom_pipeline is None or m.trust_remote_code,
            "model.custom_pipeline",
            "runs code from the pipeline's author; set model.trust_remote_code=true to allow it",
        )
        check_unet_section(m.unet, "model.unet")
        for i, lora in enumerate(m.lora):
            require(bool(lora.path.strip()), f"model.lora.{i}.path", "must not be empty")
            require(-100.0 <= lora.scale <= 100.0, f"model.lora.{i}.scale", f"must be in -100..100, got {lora.scale}")
        require(not m.lora_fuse or bool(m.lora), "model.lora_fuse", "needs model.lora")
        require(bool(p.path.strip()), "prompts.path", "must not be empty")
        require(p.limit is None or p.limit >= 1, "prompts.limit", f"must be >= 1 or null, got {p.limit}")
        text_file = p.path.lower().endswith(".txt")
        for i, name in enumerate(p.keep):
            require(not text_file, "prompts.keep", "a .txt prompt file has no columns to keep")
            require(name not in META_FIELDS, f"prompts.keep.{i}",
                    f"'{name}' is a field every sample's json has already; rename the column")
            require(name not in p.keep[:i], f"prompts.keep.{i}", f"'{name}' is listed twice")
        for setting in p.per_row:
            one_of(setting, PER_ROW_SETTINGS, f"prompts.per_row.{setting}")
            require(not text_file, f"prompts.per_row.{setting}", "a .txt prompt file has no columns")
            require(bool(p.per_row[setting].strip()), f"prompts.per_row.{setting}", "must name a column")
        require(1 <= s.steps <= 1000, "sampling.steps", f"must be in 1..1000, got {s.steps}")
        require(0.0 <= s.guidance_scale <= 100.0, "sampling.guidance_scale",
                f"must be in 0..100, got {s.guidance_scale}")
        if s.sizes is not None:
            given = [n for n in ("height", "width") if getattr(s, n) is not None]
            require(not given, f"sampling.{given[0] if given else 'height'}",
                    "give sampling.sizes or sampling.height and width, not both")
            require(len(s.sizes) >= 1, "sampling.sizes", "must list at least one [height, width]")
            for i, hw in enumerate(s.sizes):
                require(len(hw) == 2, f"sampling.sizes.{i}", f"must be [height, width], got {list(hw)}")
                try:
                    check_size(*hw)
                except ValueError as e:
                    raise SpecError(f"field 'sampling.sizes.{i}': {e}") from None
        else:
            s.height = 512 if s.height is None else s.height
            s.width = 512 if s.width is None else s.width
        for name in ("height", "width"):
            v = getattr(s, name)
            if v is None:
                continue
            require(8 <= v <= 8192, f"sampling.{name}", f"must be in 8..8192, got {v}")
            require(v % 8 == 0, f"sampling.{name}", f"must be a multiple of 8, got {v} (try {max(8, v // 8 * 8)})")
        require(0 <= s.seed <= MAX_SEED, "sampling.seed", f"must be in 0..2**63-1, got {s.seed}")
        require(1 <= s.images_per_prompt <= 10000, "sampling.images_per_prompt",
                f"must be in 1..10000, got {s.images_per_prompt}")
        require(bool(o.path.strip()), "output.path", "must not be empty")
        one_of(o.format, sorted(ENCODERS), "output.format")
        require(1 <= o.quality <= 100, "output.quality", f"must be in 1..100, got {o.quality}")
        require(1 <= o.samples_per_shard <= 1_000_000, "output.samples_per_shard",
                f"must be in 1..1000000, got {o.samples_per_shard}")
        one_of(o.resume_check, RESUME_CHECKS, "output.resume_check")
        check_cluster(c)
        require(1 <= c.encode_threads <= 64, "cluster.encode_threads", f"must be in 1..64, got {c.encode_threads}")

    def fingerprint(self, prompts_digest: str) -> str:
        """Hash of every setting a shard's bytes depend on (docs/design.md invariant 2), and nothing else.

        Two runs into the same output must agree on it; ``output.path``, the cluster address, the
        number of actors and the retry settings are left out on purpose. The prompts enter as their
        content, ``prompts_digest`` (the scanned source's :attr:`~synthmill.sharding.sources.PromptSource.digest`,
        which covers the rows up to ``prompts.limit``), and the column read from them: the same rows
        moved to another path are the same job, other rows at the same path are not.
        """
        blob = json.dumps(self._fingerprint_basis(prompts_digest), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _fingerprint_basis(self, prompts_digest: str) -> dict[str, Any]:
        m = asdict(self.model)
        for k in ("allow_pickle", "trust_remote_code"):
            m.pop(k)
        for k, default in _LATE_MODEL_KEYS.items():
            if m[k] == default:
                m.pop(k)
        if isinstance(m.get("unet"), dict):  # the string form's basis as before; a section's only with what it sets
            unet = {k: v for k, v in m["unet"].items() if v is not None}
            m["unet"] = unet["path"] if set(unet) == {"path"} else unet
        sampling = asdict(self.sampling)
        if sampling["sizes"] is None:  # added later: outputs made before it keep their fingerprint
            sampling.pop("sizes")
            sampling["height"] = 512 if sampling["height"] is None else sampling["height"]
            sampling["width"] = 512 if sampling["width"] is None else sampling["width"]
        prompts = {"rows": prompts_digest,  # .txt has no columns
                   "column": None if self.prompts.path.lower().endswith(".txt") else self.prompts.column}
        for key in ("keep", "per_row"):  # likewise: only when given
            if getattr(self.prompts, key):
                prompts[key] = getattr(self.prompts, key)
        basis = {
            "model": m,
            "prompts": prompts,
            "sampling": sampling,
            "output": {k: getattr(self.output, k) for k in ("format", "quality", "samples_per_shard", "save_latents")
                       if (k != "quality" or self.output.format != "png")  # PNG is lossless: no quality
                       and (k != "save_latents" or self.output.save_latents)},  # added later: only when set
            "batch_size": self.cluster.batch_size,
        }
        return basis

    def plan_mismatch(self, plan: dict[str, Any]) -> str | None:
        """How ``plan`` (an output's plan.json) disagrees with this spec (the output's job.yaml), or None.

        Its counts must be what these settings make of its prompts, and its fingerprint that of these settings
        with its ``prompts_digest``. The number of prompts itself is known only to the rows (their digest),
        so it is checked against ``prompts.limit`` alone. What the plan lacks (the first versions wrote fewer
        keys), or a setting job.yaml holds redacted (a URL's password), is not compared.
        """
        s, o = self.sampling, self.output
        prompts, samples, shards, per = (plan.get(k) if count(plan.get(k)) else None
                                         for k in ("prompts", "samples", "shards", "samples_per_shard"))
        if per is not None and per != o.samples_per_shard:
            return f'its "samples_per_shard" is {per:,}, and output.samples_per_shard {o.samples_per_shard:,}'
        if prompts is not None and self.prompts.limit is not None and prompts > self.prompts.limit:
            return f'its "prompts" is {prompts:,}, more than prompts.limit {self.prompts.limit:,}'
        if prompts is not None and samples is not None and samples != prompts * s.images_per_prompt:
            return (f'its "samples" is {samples:,}, and {prompts:,} prompts at sampling.images_per_prompt '
                    f'{s.images_per_prompt:,} are {prompts * s.images_per_prompt:,}')
        grown = "grown_from" in plan
        if grown:
            problem = plan_problem(plan)
            if problem:
                return problem
        elif samples is not None and shards is not None and shards != -(-samples // o.samples_per_shard):
            return (f'its "shards" is {shards:,}, and {samples:,} samples at output.samples_per_shard '
                    f'{o.samples_per_shard:,} are {-(-samples // o.samples_per_shard):,} shards')
        for where, part in [*((f"grown_from[{i}]", p) for i, p in enumerate(earlier_parts(plan))), ("", plan)]:
            digest = part.get("prompts_digest") if isinstance(part, dict) else None
            if isinstance(digest, str) and REDACTED not in json.dumps(self._fingerprint_basis(digest)):
                fingerprint = self.fingerprint(digest)
                if part.get("fingerprint") != fingerprint:
                    return (f'its {where + " " if where else ""}"fingerprint" is {part.get("fingerprint")!r}, and '
                            f'these settings with its prompts_digest give {fingerprint!r}')
        return None
