"""What a prompt row may carry besides its prompt: columns kept into each sample's metadata (``prompts.keep``)
and per-row settings that override sampling for that row (``prompts.per_row``).

The driver's scan of the prompt file checks every row with these functions, and an actor reading a shard's
rows turns the same raw values into the same settings, so a bad value is an exit 2 naming its row and column
before anything runs. An empty or null value is no setting: the row takes the job's own.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: The fields every sample's json holds (a kept column may not take one of these names).
META_FIELDS = ("key", "shard", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "height", "width",
               "model", "scheduler", "dtype", "prompt_index", "image_index", "source_row", "prompt_tokens",
               "truncated", "blank_prompt", "nsfw")
#: Settings a row may override, each read from the column ``prompts.per_row`` names for it.
PER_ROW_SETTINGS = ("negative_prompt", "seed", "guidance_scale", "size")
#: Largest seed (torch.Generator.manual_seed and the index's int64 column take no larger).
MAX_SEED = 2**63 - 1
#: Image sides: multiples of 8 in this range (the VAE's scale).
MIN_SIDE, MAX_SIDE = 8, 8192


def parse_size(value: str) -> tuple[int, int]:
    """``"HEIGHTxWIDTH"`` -> (height, width); ValueError saying what is wrong."""
    h, sep, w = value.strip().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise ValueError(f"{value!r} is not HEIGHTxWIDTH (e.g. 896x1152)")
    return check_size(int(h), int(w))


def check_size(h: int, w: int) -> tuple[int, int]:
    for side in (h, w):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"{h}x{w}: each side must be in {MIN_SIDE}..{MAX_SIDE}")
        if side % 8:
            raise ValueError(f"{h}x{w}: each side must be a multiple of 8 ({side} is not)")
    return h, w


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError(f"{value!r} is not a whole number >= 0")
        value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{value} is outside 0..2**63-1")
    return value


def _guidance(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not 0.0 <= g <= 100.0:  # NaN fails this too
        raise ValueError(f"{value!r} is outside 0..100")
    return g


def _negative(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"holds {type(value).__name__} {value!r}, not text")
    return value


def _size(value: Any) -> tuple[int, int]:
    if not isinstance(value, str):
        raise ValueError(f"holds {type(value).__name__} {value!r}, not HEIGHTxWIDTH text")
    return parse_size(value)


_PARSERS = {"negative_prompt": _negative, "seed": _seed, "guidance_scale": _guidance, "size": _size}


def row_settings(raw: dict[str, Any], per_row: dict[str, str]) -> dict[str, Any]:
    """The settings of one row from its raw values (``column -> value``): only those the row gives. ValueError
    ``(column, setting, problem)`` for a bad one."""
    out: dict[str, Any] = {}
    for setting, column in per_row.items():
        value = raw.get(column)
        if _empty(value):
            continue
        try:
            out[setting] = _PARSERS[setting](value)
        except ValueError as e:
            raise ValueError(column, setting, str(e)) from None
    return out


def json_value(value: Any) -> str | None:
    """Why ``value`` cannot be written as JSON (a date, bytes, NaN...), or None when it can."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        return f"{type(value).__name__} {value!r:.60} cannot be written as JSON ({e})"
    return None
