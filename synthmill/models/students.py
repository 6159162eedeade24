"""Student UNets for distillation, built from a teacher UNet's config, with weights copied from the teacher.

``make_student(teacher_unet, arch)`` returns a ``diffusers.UNet2DConditionModel`` whose config is the
teacher's with some blocks removed, and whose weights come from the teacher by the BK-SDM mapping. A teacher
built on the meta device (``accelerate.init_empty_weights()`` or ``with torch.device("meta")``) gives a
meta-device student: the layout only, no memory, no copy; enough to plan parameter counts.

Layouts (``arch``), each relative to the teacher's config:

``bk-base`` (BK-SDM-Base, SD 1.x/2.x teacher)
    One ResNet(+attention) pair fewer per stage (``layers_per_block`` 2 -> 1): down blocks keep 1 of their 2
    layers, up blocks 2 of their 3. SD v1.4: 859.5M -> 579.4M.
``bk-small`` (BK-SDM-Small)
    ``bk-base`` without the mid block. 482.3M.
``bk-tiny`` (BK-SDM-Tiny; segmind ``tiny-sd`` has this layout)
    ``bk-small`` without the lowest-resolution stage: the 4th down block (``DownBlock2D``) and the 1st up
    block (``UpBlock2D``) go, and the last kept down block loses its downsampler. 323.4M.
``ssd-1b`` (Segmind SSD-1B, SDXL teacher)
    Transformer depth of the deepest down stage 10 -> 4; mid block a single ResNet (no attention); up
    blocks' per-layer depths ``[[4, 4, 10], [2, 1, 1], -]``. SDXL 2.567B -> 1.331B.
``vega`` (Segmind-Vega, SDXL teacher)
    Down depths ``[-, 1, 2]``, up depths ``[[2, 2, 2], [1, 1, 1], -]`` (symmetric), mid block a single
    ResNet. 745.2M.

``arch`` may also be a path to a diffusers UNet folder (its ``config.json``, or a pipeline folder with
``unet/config.json``): that config is built as is, and weights are copied by name where the shapes match.

Weight copy (BK-SDM's ``copy_weight_from_teacher`` in ``src/kd_train_text_to_image.py``, and segmind
distill-sd's ``prepare_unet``, which agree):

* every tensor whose block is unchanged copies from the tensor of the same name;
* a down block that keeps 1 of its 2 layers takes the teacher's layer 0 (``resnets.0``/``attentions.0``);
* an up block that keeps 2 of its 3 layers takes the teacher's layers 0 and 2 (student ``resnets.1`` <-
  teacher ``resnets.2``, same for ``attentions``): layer 2 is the one whose input channels match the skip
  connection that the student's last layer receives;
* a removed stage shifts the indices: ``bk-tiny``'s ``up_blocks[i]`` takes the teacher's ``up_blocks[i + 1]``;
* a removed mid block takes nothing; a single-ResNet mid block takes the teacher's ``mid_block.resnets.0``;
* a transformer whose depth shrinks keeps the teacher's first transformer blocks.

:func:`copy_weights` returns a :class:`CopyReport` saying which student tensor came from which teacher
tensor, which stayed at their fresh initialisation, and which teacher tensors were left out.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The named student layouts.
KNOWN_ARCHS = ("bk-base", "bk-small", "bk-tiny", "ssd-1b", "vega")

#: Other spellings accepted for the names above.
ARCH_ALIASES = {
    "bk-sdm-base": "bk-base",
    "bk-sdm-small": "bk-small",
    "bk-sdm-tiny": "bk-tiny",
    "ssd1b": "ssd-1b",
    "segmind-ssd-1b": "ssd-1b",
    "segmind-vega": "vega",
}

#: Which teacher family each arch is cut from.
ARCH_FAMILY = {
    "bk-base": "sd",
    "bk-small": "sd",
    "bk-tiny": "sd",
    "ssd-1b": "sdxl",
    "vega": "sdxl",
}

#: Published UNet parameter counts (BK-SDM paper/model cards; Segmind SSD-1B and Vega model cards).
PUBLISHED_PARAMS = {
    "sd-v1.4": 859.5e6,
    "bk-base": 579.4e6,
    "bk-small": 482.3e6,
    "bk-tiny": 323.4e6,
    "sdxl-base-1.0": 2.567e9,
    "ssd-1b": 1.331e9,
    "vega": 745.2e6,
}

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
_CROSS_MID = "UNetMidBlock2DCrossAttn"

# Transformer depths of the Segmind students at the SDXL positions that have attention; ``None`` marks the
# attention-free blocks (down 0, up 2), which keep whatever the teacher's config says.
#   SSD-1B: ComfyUI's SSD1B input depths [0, 0, 2, 2, 4, 4]; diffusers PR #5400 (per-layer up depths, a
#   single-ResNet UNetMidBlock2D); up [[4, 4, 10], [2, 1, 1]] per the project's design notes and the
#   cosine-similarity study in furusu/SSD-1B-anime (up_blocks.0 layers 0-1 and up_blocks.1 layers 1-2 shrink).
#   Vega: ComfyUI's Segmind_Vega input depths [0, 0, 1, 1, 2, 2]; "symmetrical" per Segmind's Vega deep dive,
#   whose down/mid/up split (247M / 31M / 460M) this layout reproduces.
_SEGMIND_DEPTHS = {
    "ssd-1b": {"down": (None, 2, 4), "up": ((4, 4, 10), (2, 1, 1), None)},
    "vega": {"down": (None, 1, 2), "up": ((2, 2, 2), (1, 1, 1), None)},
}


# --------------------------------------------------------------------------------------------------------
# plans: the student's config and where each of its blocks comes from


@dataclass(frozen=True)
class StageMap:
    """Where one student down/up block comes from: a teacher block, and a teacher layer per student layer."""

    teacher: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class StudentPlan:
    """A student layout: its config and the block/layer mapping from the teacher."""

    arch: str
    config: dict[str, Any]
    down: tuple[StageMap, ...]
    up: tuple[StageMap, ...]
    by_name: bool = False  # a student config from a folder: copy by name, no block mapping


@dataclass
class CopyReport:
    """What :func:`copy_weights` did (or, for a meta-device build, would do).

    ``sources`` maps each student tensor (state-dict key) to the teacher tensor it takes its values from;
    ``initialised`` lists student tensors with no teacher source (they keep their fresh initialisation);
    ``unused_teacher`` lists teacher tensors that no student tensor comes from. ``weights_copied`` is False
    when teacher or student lives on the meta device (layout only: the mapping is planned, nothing copied).
    """

    arch: str
    sources: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    unused_teacher: list[str] = field(default_factory=list)
    weights_copied: bool = False

    def remapped(self) -> dict[str, str]:
        """The sources whose teacher tensor has another name than the student tensor."""
        return {s: t for s, t in self.sources.items() if s != t}

    def summary(self) -> str:
        verb = "copied" if self.weights_copied else "planned (meta device, nothing copied)"
        return (
            f"{self.arch}: {len(self.sources)} student tensors {verb} from the teacher "
            f"({len(self.remapped())} renamed), {len(self.initialised)} left initialised, "
            f"{len(self.unused_teacher)} teacher tensors unused"
        )


def arch_name(arch: str) -> str | None:
    """The known layout that ``arch`` names (spelt in any case, with ``_`` or an alias), or None."""
    name = arch.strip().lower().replace("_", "-")
    name = ARCH_ALIASES.get(name, name)
    return name if name in KNOWN_ARCHS else None


def _normalise_arch(arch: str | os.PathLike) -> str | Path:
    """A known arch name, or a Path for a folder arch; ValueError for anything else."""
    if isinstance(arch, os.PathLike):
        return Path(arch)
    if not isinstance(arch, str):
        raise TypeError(f"student arch must be a name or a path, not {type(arch).__name__}")
    name = arch_name(arch)
    if name:
        return name
    if os.path.exists(arch):
        return Path(arch)
    raise ValueError(
        f"unknown student arch {arch!r}; known: {', '.join(KNOWN_ARCHS)} "
        "(or a path to a diffusers UNet folder with a config.json)"
    )


def _teacher_config(teacher: Any) -> dict[str, Any]:
    cfg = teacher.config if hasattr(teacher, "config") else teacher
    if not isinstance(cfg, Mapping):
        raise TypeError(f"teacher must be a UNet2DConditionModel (or its config), not {type(teacher).__name__}")
    return {k: copy.deepcopy(v) for k, v in dict(cfg).items() if not k.startswith("_")}


def _family(cfg: Mapping[str, Any]) -> str:
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _describe(cfg: Mapping[str, Any]) -> str:
    return (
        f"down_block_types={list(cfg.get('down_block_types', []))}, "
        f"layers_per_block={cfg.get('layers_per_block')}, mid_block_type={cfg.get('mid_block_type', _CROSS_MID)!r}"
    )


def _check_family(arch: str, cfg: Mapping[str, Any]) -> None:
    want, have = ARCH_FAMILY[arch], _family(cfg)
    if want == have:
        return
    if want == "sd":
        others = [a for a in KNOWN_ARCHS if ARCH_FAMILY[a] == "sdxl"]
        raise ValueError(
            f"student arch {arch!r} is a BK-SDM layout cut from an SD 1.x/2.x UNet, but the teacher is an "
            f"SDXL UNet (addition_embed_type='text_time'); for SDXL teachers use one of: {', '.join(others)}"
        )
    others = [a for a in KNOWN_ARCHS if ARCH_FAMILY[a] == "sd"]
    raise ValueError(
        f"student arch {arch!r} is a Segmind layout cut from an SDXL UNet (addition_embed_type='text_time'), "
        f"but the teacher has addition_embed_type={cfg.get('addition_embed_type')!r}, i.e. an SD 1.x/2.x-style "
        f"UNet; for such teachers use one of: {', '.join(others)}"
    )


def _check_layout(arch: str, cfg: Mapping[str, Any], down: Sequence[str], up: Sequence[str]) -> None:
    n = len(down)
    layers = _per_block(cfg.get("layers_per_block", 2), len(cfg.get("down_block_types", ())))
    ok = (
        tuple(cfg.get("down_block_types", ())) == tuple(down)
        and tuple(cfg.get("up_block_types", ())) == tuple(up)
        and layers == [2] * n
        and cfg.get("mid_block_type", _CROSS_MID) == _CROSS_MID
    )
    if not ok:
        raise ValueError(
            f"student arch {arch!r} needs a teacher with down_block_types={list(down)}, "
            f"up_block_types={list(up)}, layers_per_block=2 and a {_CROSS_MID} mid block; "
            f"this teacher has {_describe(cfg)}, up_block_types={list(cfg.get('up_block_types', []))}"
        )


def _bk_plan(arch: str, cfg: dict[str, Any]) -> StudentPlan:
    _check_family(arch, cfg)
    _check_layout(arch, cfg, _SD_DOWN, _SD_UP)
    student = dict(cfg)
    student["layers_per_block"] = 1
    if arch in ("bk-small", "bk-tiny"):
        student["mid_block_type"] = None
    n = len(_SD_DOWN)
    # Per-layer transformer depths, where a teacher config spells them out, follow the kept layers.
    tl = student.get("transformer_layers_per_block")
    if isinstance(tl, (list, tuple)):
        student["transformer_layers_per_block"] = [[d[0]] if isinstance(d, (list, tuple)) else d for d in tl]
    rev = student.get("reverse_transformer_layers_per_block")
    if rev is not None:
        rev = [[d[0], d[2]] if isinstance(d, (list, tuple)) else d for d in rev]
        student["reverse_transformer_layers_per_block"] = rev[1:] if arch == "bk-tiny" else rev
    if arch == "bk-tiny":
        # Drop the lowest-resolution stage: the last down block and the first up block. Per-block list
        # options are indexed like the down blocks (diffusers reverses them for the up blocks), so the last
        # entry goes.
        for key in ("block_out_channels", "down_block_types", "attention_head_dim", "num_attention_heads",
                    "cross_attention_dim", "transformer_layers_per_block", "only_cross_attention"):
            if isinstance(student.get(key), (list, tuple)):
                student[key] = list(student[key])[:-1]
        student["up_block_types"] = list(student["up_block_types"])[1:]
        down = tuple(StageMap(i, (0,)) for i in range(n - 1))
        up = tuple(StageMap(i + 1, (0, 2)) for i in range(n - 1))
    else:
        down = tuple(StageMap(i, (0,)) for i in range(n))
        up = tuple(StageMap(i, (0, 2)) for i in range(n))
    return StudentPlan(arch, student, down, up)


def _teacher_depths(cfg: Mapping[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Per-layer transformer depths of the teacher's down and up blocks."""
    n = len(cfg["down_block_types"])
    layers = _per_block(cfg.get("layers_per_block", 2), n)
    tl = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    down = [_per_block(tl[i], layers[i]) for i in range(n)]
    rev = cfg.get("reverse_transformer_layers_per_block")
    rev_layers = list(reversed(layers))
    if rev is None:
        rev = list(reversed(tl))
    up = [_per_block(rev[i], rev_layers[i] + 1) for i in range(n)]
    return down, up


def _segmind_plan(arch: str, cfg: dict[str, Any]) -> StudentPlan:
    _check_family(arch, cfg)
    _check_layout(arch, cfg, _SDXL_DOWN, _SDXL_UP)
    t_down, t_up = _teacher_depths(cfg)
    want = _SEGMIND_DEPTHS[arch]
    down_depth: list[Any] = []
    for i, d in enumerate(want["down"]):
        if d is None:
            down_depth.append(t_down[i][0] if len(set(t_down[i])) == 1 else t_down[i])
            continue
        if min(t_down[i]) < d:
            raise ValueError(
                f"student arch {arch!r} keeps {d} transformer blocks per layer in down block {i}, but the "
                f"teacher has only {t_down[i]} there"
            )
        down_depth.append(d)
    up_depth: list[list[int]] = []
    for i, d in enumerate(want["up"]):
        if d is None:
            up_depth.append(list(t_up[i]))
            continue
        short = [j for j, (s, t) in enumerate(zip(d, t_up[i], strict=False)) if s > t]
        if short:
            raise ValueError(
                f"student arch {arch!r} needs transformer depths {list(d)} in up block {i}, but the teacher has "
                f"only {t_up[i]} there"
            )
        up_depth.append(list(d))
    if any(isinstance(d, list) for d in down_depth):
        raise ValueError(f"student arch {arch!r}: the teacher's down-block transformer depths {t_down} vary per layer")
    student = dict(cfg)
    student["transformer_layers_per_block"] = down_depth
    student["reverse_transformer_layers_per_block"] = up_depth
    student["mid_block_type"] = "UNetMidBlock2D"  # a single ResNet, no attention
    n = len(_SDXL_DOWN)
    down = tuple(StageMap(i, (0, 1)) for i in range(n))
    up = tuple(StageMap(i, (0, 1, 2)) for i in range(n))
    return StudentPlan(arch, student, down, up)


def _folder_config(path: Path) -> dict[str, Any]:
    if path.is_file():
        cfg_file = path
    elif (path / "config.json").is_file():
        cfg_file = path / "config.json"
    elif (path / "unet" / "config.json").is_file():
        cfg_file = path / "unet" / "config.json"
    else:
        raise ValueError(f"student arch folder {str(path)!r} has no config.json (nor unet/config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the student UNet config {str(cfg_file)!r}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_file)!r} holds a JSON {type(cfg).__name__}, "
                         "not a UNet config (an object of settings)")
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(
            f"{str(cfg_file)!r} describes a {cfg.get('_class_name')}, not a UNet2DConditionModel"
        )
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _folder_plan(path: Path, teacher_cfg: Mapping[str, Any]) -> StudentPlan:
    student = _folder_config(path)
    defaults = {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 1280, "addition_embed_type": None}
    for key, default in defaults.items():
        s, t = student.get(key, default), teacher_cfg.get(key, default)
        if sorted(set(_per_block(s, 1))) != sorted(set(_per_block(t, 1))):
            raise ValueError(
                f"student config {str(path)!r} does not fit the teacher: {key}={s!r}, but the teacher has "
                f"{key}={t!r} (a student must take the teacher's inputs and conditioning)"
            )
    return StudentPlan(str(path), student, (), (), by_name=True)


def plan_student(teacher: Any, arch: str | os.PathLike) -> StudentPlan:
    """The student's config and block mapping for ``arch``, from a teacher UNet (or its config dict)."""
    cfg = _teacher_config(teacher)
    name = _normalise_arch(arch)
    if isinstance(name, Path):
        return _folder_plan(name, cfg)
    if ARCH_FAMILY[name] == "sd":
        return _bk_plan(name, cfg)
    return _segmind_plan(name, cfg)


def student_config(teacher: Any, arch: str | os.PathLike) -> dict[str, Any]:
    """The student's UNet config for ``arch`` (a plain dict for ``UNet2DConditionModel.from_config``)."""
    return copy.deepcopy(plan_student(teacher, arch).config)


# --------------------------------------------------------------------------------------------------------
# the weight mapping and copy

_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^(resnets|attentions)\.(\d+)\.(.+)$")


def _teacher_key(key: str, plan: StudentPlan) -> str:
    """The teacher state-dict key that the student's ``key`` takes its values from."""
    if plan.by_name:
        return key
    m = _BLOCK_RE.match(key)
    if not m:
        return key  # conv_in/out, time and added embeddings, mid_block.*: same name
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    stages = plan.down if kind == "down_blocks" else plan.up
    if i >= len(stages):
        return key  # a student that is not of this layout: fall back to the name (shapes decide)
    stage = stages[i]
    lm = _LAYER_RE.match(rest)
    if lm:
        j = int(lm.group(2))
        if j >= len(stage.layers):
            return key
        # transformer_blocks.k inside an attention keeps its index: a shallower student keeps the first ones
        rest = f"{lm.group(1)}.{stage.layers[j]}.{lm.group(3)}"
    return f"{kind}.{stage.teacher}.{rest}"


def _is_meta(model: Any) -> bool:
    """True when all parameters are on the meta device (buffers are ignored: ``init_empty_weights`` keeps
    them real by default); ValueError when only some are."""
    metas = [p.is_meta for p in model.parameters()]
    if any(metas) and not all(metas):
        raise ValueError(
            "the model has some parameters on the meta device and some not; load it fully, or build it "
            "entirely on the meta device (layout only)"
        )
    return bool(metas) and all(metas)


def _map_weights(teacher: Any, student: Any, plan: StudentPlan) -> CopyReport:
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    report = CopyReport(arch=plan.arch)
    used: set[str] = set()
    for key, tensor in s_sd.items():
        src = _teacher_key(key, plan)
        if src in t_sd and tuple(t_sd[src].shape) == tuple(tensor.shape):
            report.sources[key] = src
            used.add(src)
        else:
            report.initialised.append(key)
    report.unused_teacher = [k for k in t_sd if k not in used]
    return report


def _copy(teacher: Any, student: Any, plan: StudentPlan) -> CopyReport:
    import torch

    teacher_meta, student_meta = _is_meta(teacher), _is_meta(student)
    report = _map_weights(teacher, student, plan)
    if teacher_meta or student_meta:
        return report  # layout only: the mapping is planned, there is nothing to copy from or into
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    with torch.no_grad():
        for key, src in report.sources.items():
            s_sd[key].copy_(t_sd[src])
    report.weights_copied = True
    return report


def copy_weights(teacher: Any, student: Any, arch: str | os.PathLike) -> CopyReport:
    """Copy the teacher's weights into a student of layout ``arch`` by the BK-SDM mapping; return the report.

    Student tensors whose mapped teacher tensor is missing or has another shape keep their values and are
    listed in ``report.initialised``. With either model on the meta device nothing is copied and
    ``report.weights_copied`` is False (the mapping is still reported).
    """
    return _copy(teacher, student, plan_student(teacher, arch))


def count_parameters(model: Any) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def make_student(teacher_unet: Any, arch: str | os.PathLike, *, return_report: bool = False):
    """Build the student UNet of layout ``arch`` from ``teacher_unet`` and copy the teacher's weights into it.

    ``arch`` is one of :data:`KNOWN_ARCHS` (``bk-base``, ``bk-small``, ``bk-tiny`` for SD 1.x/2.x teachers;
    ``ssd-1b``, ``vega`` for SDXL teachers) or a path to a diffusers UNet folder. The student lives on the
    teacher's device with the teacher's dtype. A teacher on the meta device gives a meta-device student
    (layout only, no memory, no copy). Returns the student, or ``(student, CopyReport)`` with
    ``return_report=True``. Raises ValueError for an unknown arch or one that does not fit the teacher.
    """
    import torch
    from diffusers import UNet2DConditionModel

    plan = plan_student(teacher_unet, arch)
    meta = _is_meta(teacher_unet)
    first = next(iter(teacher_unet.parameters()), None)
    device = torch.device("meta") if meta else (first.device if first is not None else torch.device("cpu"))
    dtype = first.dtype if first is not None else None
    with torch.device(device):
        student = UNet2DConditionModel.from_config(copy.deepcopy(plan.config))
    if dtype is not None and dtype.is_floating_point:
        student = student.to(dtype=dtype)
    student.train(teacher_unet.training)
    report = _copy(teacher_unet, student, plan)
    return (student, report) if return_report else student


def _block_of(key: str) -> str:
    """The block a state-dict key belongs to: ``down_blocks.1``, ``up_blocks.0``, ``mid_block``, or its top module."""
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def first_mismatch(student: Any, other: Any) -> str | None:
    """Where the weights of ``other`` (a UNet, or its state dict) do not fit the layout of ``student``, in the
    student's order: the first tensor missing from ``other``, of another shape there, or (after the student's
    tensors) one ``other`` has and the student has not, named with its block. None when every tensor fits.
    Works on the meta device."""
    mine = student.state_dict()
    theirs = other if isinstance(other, Mapping) else other.state_dict()
    for key, tensor in mine.items():
        if key not in theirs:
            return f"block {_block_of(key)}: {key} is missing"
        if tuple(theirs[key].shape) != tuple(tensor.shape):
            return (f"block {_block_of(key)}: {key} has shape {tuple(theirs[key].shape)}, the student's is "
                    f"{tuple(tensor.shape)}")
    extra = [k for k in theirs if k not in mine]
    if extra:
        return f"block {_block_of(extra[0])}: {extra[0]} is not in the student"
    return None
