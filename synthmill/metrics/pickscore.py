"""PickScore (``pickscore``): the preference score of each generated image with its caption.

PickScore has no package: its release is a transformers ``CLIPModel`` (``yuvalkirstain/PickScore_v1``) with the
processor of LAION's CLIP-ViT-H-14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), scored as its README does:

- images and captions through the processor (``padding=True, truncation=True, max_length=77``);
- score = ``logit_scale.exp()`` times the cosine of the normalised image and text features.

The model is named as transformers names one: a hub id or a local folder (``config.json`` of a CLIP and its
weights). ``pickscore.processor`` null is the release's processor for the release's model, else the model's own
folder. The weights file's sha256 is recorded: hashed when it is local, the hub's LFS digest otherwise (the
revision asked then pinned for every actor).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from synthmill.errors import SpecError, first_line
from synthmill.metrics.base import Network
from synthmill.metrics.preference import score_feature, score_metric

RELEASE_MODEL = "yuvalkirstain/PickScore_v1"
RELEASE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROTOCOL = ("PickScore release (README): transformers CLIPModel and CLIPProcessor (padding, truncation to 77 "
            "tokens); score = logit_scale.exp() * cosine of the normalised image and text features, float32; "
            "the mean over the generated images")


def names(spec: Any) -> tuple[str, str]:
    """(model, processor) as transformers will load them."""
    model = spec.pickscore.model or RELEASE_MODEL
    processor = spec.pickscore.processor or (RELEASE_PROCESSOR if spec.pickscore.model is None else model)
    return model, processor


@functools.lru_cache(maxsize=4)
def processor_of(name: str):
    """The processor ``name`` (loaded once per process; its image half runs on the scorer's decode threads)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name)


def pixels(spec: Any, image: Any):
    """One PIL image made ready by the processor: its (3, H, W) ``pixel_values``."""
    return processor_of(names(spec)[1])(images=[image], return_tensors="pt")["pixel_values"][0]


class PickScorer:
    """One PickScore model and processor; :meth:`scores` gives each image's score with its caption."""

    def __init__(self, model: str, processor: str, device: str = "cpu", revision: str | None = None):
        import torch
        from transformers import CLIPModel

        self.processor = processor_of(processor)
        self.model = CLIPModel.from_pretrained(model, revision=revision).eval().requires_grad_(False).to(device)
        self.device, self.torch = device, torch

    def _features(self, out: Any):
        emb = out if isinstance(out, self.torch.Tensor) else out.pooler_output  # transformers 5: an output object
        return emb / emb.norm(dim=-1, keepdim=True)

    def scores(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 PickScore of each PIL image with its caption."""
        image_inputs = self.processor(images=images, padding=True, truncation=True, max_length=77,
                                      return_tensors="pt")
        return self.scores_of_pixels(list(image_inputs["pixel_values"]), captions)

    def scores_of_pixels(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 PickScore of each image's ``pixel_values`` with its caption."""
        torch = self.torch
        image_inputs = {"pixel_values": torch.stack(images).to(self.device)}
        text_inputs = self.processor(text=captions, padding=True, truncation=True, max_length=77,
                                     return_tensors="pt").to(self.device)
        with torch.inference_mode():
            a = self._features(self.model.get_image_features(**image_inputs))
            b = self._features(self.model.get_text_features(**text_inputs))
            s = self.model.logit_scale.exp() * (a * b).sum(-1)
        return s.double().cpu().numpy()


class _Net:
    def __init__(self, spec: Any, info: dict[str, Any], features: tuple[str, ...], device: str):
        model, processor = names(spec)
        self.scorer = PickScorer(model, processor, device, info.get("revision"))

    def extract(self, features: tuple[str, ...], images: list[Any], captions: list[str]) -> dict[str, Any]:
        return {"pickscore": self.scorer.scores_of_pixels(images, captions)}


def _local_model(folder: str, field: str) -> str:
    """The sha256 of a local CLIP folder's weights file; SpecError when it is not a transformers CLIP."""
    from synthmill.metrics.weights import sha256_file

    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise SpecError(f"{field} {folder}: no config.json (a transformers CLIPModel folder is needed)") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"{field} {folder}: {config} cannot be read ({first_line(e)})") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "clip":
        raise SpecError(f"{field} {folder}: not the PickScore network (a transformers CLIP), its config.json says "
                        f"model_type {kind!r}")
    found = next((f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if found is None:
        raise SpecError(f"{field} {folder}: no weights file ({' or '.join(WEIGHT_FILES)})")
    return sha256_file(os.path.join(folder, found))


def _hub_model(repo: str, field: str) -> tuple[str, str | None]:
    """(revision, weights sha256) of a hub model: one metadata request, nothing downloaded; (None, None) under
    ``HF_HUB_OFFLINE`` (the actors load it from the hub cache, and the digest is not known)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None, None

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as e:  # not found, gated, offline: the job cannot load it
        raise SpecError(f"{field} {repo}: cannot read the model's files on the hub ({first_line(e)[:200]})") from None
    files = {s.rfilename: s for s in info.siblings or ()}
    found = next((files[f] for f in WEIGHT_FILES if f in files), None)
    if found is None:
        raise SpecError(f"{field} {repo}: no weights file ({' or '.join(WEIGHT_FILES)}) in the hub repository")
    return info.sha, (found.lfs.sha256 if found.lfs else None)


def _check_processor(processor: str, field: str) -> None:
    if os.path.isdir(processor):
        if not any(os.path.isfile(os.path.join(processor, f)) for f in ("preprocessor_config.json",
                                                                         "processor_config.json")):
            raise SpecError(f"{field} {processor}: no preprocessor_config.json or processor_config.json (a "
                            "transformers CLIPProcessor folder is needed)")
    elif os.path.exists(processor):
        raise SpecError(f"{field} {processor}: a file, not a processor folder or hub id")


def _check_network(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    from synthmill.models.loading import is_hub_id

    model, processor = names(spec)
    field = "pickscore.model"
    if os.path.isdir(model):
        revision, sha = None, _local_model(model, field)
    elif is_hub_id(model):
        revision, sha = _hub_model(model, field)
    else:
        raise SpecError(f"{field} {model}: neither a local folder nor a hub id of the form org/name")
    _check_processor(processor, "pickscore.processor" if spec.pickscore.processor else field)
    return {"weights": model, "sha256": sha, "revision": revision, "processor": processor}


def _describe(spec: Any) -> dict[str, Any]:
    model, processor = names(spec)
    return {"model": model, "processor": processor, "score": PROTOCOL}


NETWORK = Network("pickscore", load=_Net, prepare=pixels, check=_check_network,
                  captions="the pickscore metric scores each image against its caption")
SCORES = score_feature("pickscore")
PICKSCORE = score_metric("pickscore", _describe, _describe)
