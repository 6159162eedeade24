"""HPSv2 and HPSv2.1 (``hpsv2``): the Human Preference Score of each generated image with its caption.

The network and its preprocessing are the ``hpsv2`` release's (``hpsv2/img_score.py``, which synthmill cannot
import: the package pins pytest 7.2 and protobuf < 4, and downloads the LAION CLIP at its first call). It is an
open_clip ViT-H-14 whose whole state dict the HPS checkpoint replaces (``torch.load(cp)["state_dict"]``), built
here with the installed open_clip from the same configuration:

- image: ``ToTensor``, then the longest side resized to the model's input size (torchvision bicubic on the
  tensor) and the shorter one zero-padded around the centre to a square (the release's ``ResizeMaxSize``, its
  ``light_augmentation`` eval transform), then normalised with OpenAI CLIP's mean and std;
- caption: open_clip's tokenizer, 77 tokens, the end token kept last;
- score: the cosine of the normalised image and text embeddings (``diag(image_features @ text_features.T)``),
  under CUDA autocast (float16) on a GPU as the release runs it, in float32 on a CPU (where its autocast is off).

The release scores one image at a time; the scorer scores a batch, which changes nothing but rounding. An image
whose longest side already has the input size but is not square is padded too (the release would fail on it).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from synthmill.errors import SpecError, first_line
from synthmill.metrics.base import Network
from synthmill.metrics.preference import resolve_weights, score_feature, score_metric

#: The release's checkpoints (``hpsv2.utils.hps_version_map`` on the ``xswu/HPSv2`` hub repository).
RELEASE = {
    "v2.0": "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2_compressed.pt",
    "v2.1": "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt",
}
ARCHITECTURE = "ViT-H-14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROTOCOL = ("HPSv2 release (hpsv2/img_score.py): ToTensor, longest side resized to the input size (torchvision "
            "bicubic on the tensor) and zero-padded to a square, OpenAI CLIP mean/std; open_clip tokenizer (77 "
            "tokens); score = cosine of the normalised image and text embeddings; CUDA autocast float16 on a GPU, "
            "float32 on a CPU; the mean over the generated images")


def architecture_config(name: str) -> dict[str, Any]:
    """The open_clip model configuration ``name`` stands for: an open_clip model name, or a JSON file (or a folder
    holding ``open_clip_config.json``) with one (``model_cfg`` inside, or the configuration itself). SpecError."""
    import open_clip

    field = "hpsv2.architecture"
    path = os.path.join(name, "open_clip_config.json") if os.path.isdir(name) else name
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError) as e:
            raise SpecError(f"{field} {name}: cannot read {path} ({first_line(e)})") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise SpecError(f"{field} {name!r}: neither an open_clip model name nor a JSON file of one")
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise SpecError(f"{field} {name}: not an open_clip model configuration (embed_dim, vision_cfg, text_cfg)")
    if "hf_model_name" in cfg["text_cfg"] or cfg.get("custom_text") or "timm_model_name" in cfg["vision_cfg"]:
        raise SpecError(f"{field} {name}: a CLIP of open_clip's own towers is needed (HPSv2 is a ViT-H-14)")
    return cfg


@functools.lru_cache(maxsize=8)
def input_size(name: str) -> int:
    """The image input size of the architecture ``name`` (read once per process)."""
    size = architecture_config(name)["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else size


def build(cfg: dict[str, Any], device: Any = "cpu"):
    """open_clip's CLIP of configuration ``cfg`` (random weights), made on ``device``."""
    import torch
    from open_clip.model import CLIP

    with torch.device(device):
        return CLIP(**json.loads(json.dumps(cfg)))


def check_state(state: dict[str, Any], cfg: dict[str, Any], path: str, name: str) -> None:
    """WeightsError unless ``state`` is the state dict of the CLIP ``cfg``, key for key and shape for shape."""
    import torch

    from synthmill.metrics.weights import WeightsError

    want = {k: tuple(v.shape) for k, v in build(cfg, "meta").state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    what = f"not the weights of the HPSv2 network ({name})"
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(state) - set(have) | set(have) - set(want))
    if missing or unexpected:
        keys = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + (
            f"unexpected {', '.join(map(str, unexpected[:3]))}" if unexpected else "")
        raise WeightsError(f"{path}: {what} ({len(missing)} keys missing, {len(unexpected)} unexpected: {keys})")
    wrong = next((k for k in want if want[k] != have[k]), None)
    if wrong is not None:
        raise WeightsError(f"{path}: {what} ({wrong} has shape {list(have[wrong])}, the network's is "
                           f"{list(want[wrong])})")


def source(spec: Any) -> str:
    """Where the checkpoint comes from: ``hpsv2.weights``, else the release's file of ``hpsv2.version``."""
    return spec.hpsv2.weights or RELEASE[spec.hpsv2.version]


def pixels(image: Any, size: int):
    """The release's eval transform of one RGB PIL image: a (3, size, size) float32 tensor."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    x = F.to_tensor(image)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        h, w = round(h * scale), round(w * scale)
        x = F.resize(x, [h, w], InterpolationMode.BICUBIC)
    if (h, w) != (size, size):
        ph, pw = size - h, size - w
        x = F.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return F.normalize(x, OPENAI_MEAN, OPENAI_STD)


class HpsScorer:
    """One HPS network; :meth:`scores` gives each image's score with its caption."""

    def __init__(self, cfg: dict[str, Any], state: dict[str, Any], device: str = "cpu"):
        import torch
        from open_clip.tokenizer import SimpleTokenizer

        self.model = build(cfg, device)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().requires_grad_(False)
        size = cfg["vision_cfg"]["image_size"]
        self.size = size[0] if isinstance(size, (list, tuple)) else size
        self.tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
        self.device, self.torch = device, torch

    def scores(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 HPS of each PIL image with its caption."""
        return self.scores_of_pixels([pixels(im, self.size) for im in images], captions)

    def scores_of_pixels(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 HPS of each image made ready by :func:`pixels` with its caption."""
        torch = self.torch
        x = torch.stack(images).to(self.device)
        tokens = self.tokenizer(captions).to(self.device)
        cuda = str(self.device).startswith("cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            a = self.model.encode_image(x, normalize=True)
            b = self.model.encode_text(tokens, normalize=True)
            s = torch.diagonal(a @ b.T)
        return s.double().cpu().numpy()


class _Net:
    def __init__(self, spec: Any, info: dict[str, Any], features: tuple[str, ...], device: str):
        from synthmill.metrics import weights

        path, _ = weights.resolve(info["weights"], info["sha256"], spec.storage)  # this node's copy
        self.scorer = HpsScorer(architecture_config(spec.hpsv2.architecture), weights.load_state_dict(path), device)

    def extract(self, features: tuple[str, ...], images: list[Any], captions: list[str]) -> dict[str, Any]:
        return {"hpsv2": self.scorer.scores_of_pixels(images, captions)}


def _check_network(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture, and the checkpoint (a URL is downloaded and hashed once here) checked to be its weights."""
    from synthmill.metrics import weights

    h = spec.hpsv2
    cfg = architecture_config(h.architecture)
    url = source(spec)
    path, sha = resolve_weights("hpsv2.weights", url, h.weights_sha256, opts)
    try:
        check_state(weights.load_state_dict(path), cfg, path, h.architecture)
    except weights.WeightsError as e:
        raise SpecError(f"hpsv2.weights: {e}") from None
    return {"weights": url, "sha256": sha, "path": path, "architecture": h.architecture,
            "version": h.version if h.weights is None else None}


def _describe(spec: Any) -> dict[str, Any]:
    h = spec.hpsv2
    return {"version": h.version, "architecture": h.architecture, "weights": h.weights or RELEASE[h.version],
            "weights_sha256": h.weights_sha256, "score": PROTOCOL}


NETWORK = Network("hpsv2", load=_Net, check=_check_network,
                  prepare=lambda spec, image: pixels(image, input_size(spec.hpsv2.architecture)),
                  captions="the hpsv2 metric scores each image against its caption")
SCORES = score_feature("hpsv2")
HPSV2 = score_metric("hpsv2", _describe, _describe)
