"""CLIP score with open_clip: cosine similarity of each image with its own caption.

The model is named the way open_clip names it: a built-in architecture with a ``pretrained`` tag
(``ViT-g-14`` + ``laion2b_s34b_b88k``, BK-SDM's) or a local checkpoint file, ``hf-hub:org/repo``, or
``local-dir:/path`` (a folder with ``open_clip_config.json`` and weights). Images go through the
model's own eval transform; captions through the model's own tokenizer, which cuts a caption to the
context length (77 for CLIP) and keeps the end-of-text token last, where CLIP reads the text embedding.

Two numbers come out: the raw mean cosine (BK-SDM's tables, e.g. 0.2958) and the torchmetrics /
MLPerf form, the mean of ``100 * max(cosine, 0)`` (e.g. 31.7).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def known_model(model: str, pretrained: str | None, section: str = "clip") -> str | None:
    """Why ``model``/``pretrained`` cannot load, or None; checks names and files only, loads nothing.
    ``section``: the spec section that names them (``clip``, ``cmmd``), for the message."""
    import os

    import open_clip

    if model.startswith("hf-hub:"):
        from synthmill.models.loading import HUB_LOGIN, hub_file_missing

        repo = model[len("hf-hub:"):]
        missing, where = hub_file_missing(repo, "open_clip_config.json", None, f"{section}.model {model}")
        if missing in ("repo", "gated"):
            return (f"{section}.model {model}: {'a gated model' if missing == 'gated' else 'no such model'} on {where} "
                    f"(a private or gated model needs access and a token: {HUB_LOGIN})")
        if missing == "file":
            return f"{section}.model {model}: not an open_clip model (no open_clip_config.json on {where})"
        return None
    if model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        config = os.path.join(folder, "open_clip_config.json")
        if not os.path.isfile(config):
            return f"{section}.model {model}: no open_clip_config.json in {folder}"
        try:
            with open(config, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError) as e:
            return f"{section}.model {model}: {config} cannot be read ({e})"
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
            return f"{section}.model {model}: {config} has no model_cfg object (open_clip's local-dir layout)"
        return None
    names = open_clip.list_models()
    if model not in names:
        import difflib

        close = difflib.get_close_matches(model, names, n=3)
        return (f"{section}.model {model!r}: not an open_clip model"
                + (f"; did you mean {', '.join(close)}?" if close else ""))
    if pretrained is None or os.path.isfile(pretrained):
        return None
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        return (f"{section}.pretrained {pretrained!r}: neither a file nor a pretrained tag of {model} "
                f"(tags: {', '.join(tags) or 'none'})")
    return None


class ClipScorer:
    """Holds one open_clip model; :meth:`cosines` scores (image, caption) pairs."""

    def __init__(self, model: str, pretrained: str | None, device: str = "cpu"):
        import open_clip
        import torch

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained,
                                                                               device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device, self.torch = device, torch
        self.context_length = getattr(self.tokenizer, "context_length", None) or 77

    def truncated(self, captions: list[str]) -> int:
        """How many captions are longer than the context (start and end tokens included)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return 0
        return sum(len(encode(c)) + 2 > self.context_length for c in captions)

    def cosines(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 cosine of each PIL image with its caption."""
        torch = self.torch
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(captions).to(self.device)
        with torch.inference_mode():
            a = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            b = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (a * b).sum(-1).double().cpu().numpy()

    def embeddings(self, images: list[Any]) -> np.ndarray:
        """(B, d) float32 image embeddings of PIL images, as ``encode_image`` gives them (not normalised)."""
        torch = self.torch
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return self.model.encode_image(pixels).float().cpu().numpy()


def checkpoint_file(model: str, pretrained: str | None) -> str | None:
    """The local file open_clip loaded the weights of ``model``/``pretrained`` from (after it loaded them, so a
    download is in its cache), or None when it loaded none (a built-in architecture without ``pretrained``)."""
    import os
    from pathlib import Path

    from open_clip import factory
    from open_clip import pretrained as tags

    if model.startswith("local-dir:"):
        found = factory._find_checkpoint_in_dir(Path(model[len("local-dir:"):]))
        return str(found) if found else None
    if model.startswith("hf-hub:"):
        return tags.download_pretrained_from_hf(model[len("hf-hub:"):])
    if pretrained is None:
        return None
    if os.path.isfile(pretrained):
        return pretrained
    return tags.download_pretrained(tags.get_pretrained_cfg(model, pretrained)) or None


def clip_scores(cos: np.ndarray) -> dict[str, float]:
    cos = np.asarray(cos, np.float64)
    return {
        "clip_score": float(cos.mean()),
        "clip_score_x100": float((100.0 * np.clip(cos, 0.0, None)).mean()),
    }
