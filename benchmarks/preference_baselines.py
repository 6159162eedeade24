"""How users score human preference today, one release after another: each release's own scoring loop.

``RELEASE_LOOPS[metric](files, captions, section, device)`` returns one float64 score per image file, in order;
``section`` is the evaluate spec's section of that metric as a dict (``weights`` / ``architecture`` for
``hpsv2``, ``weights`` / ``med_config`` / ``tokenizer`` for ``image_reward``, ``model`` / ``processor`` for
``pickscore``), naming the same files the evaluate job loads. No release can be imported beside this stack
(``hpsv2`` pins pytest 7.2 and protobuf < 4; ``image-reward`` pins timm 0.6.13 and needs fairscale; PickScore has
no package), so each loop is the release's scoring written out as it runs:

- ``hpsv2`` (``hpsv2/img_score.py``): one image at a time, the image opened from its file, the release's eval
  transform, the prompt tokenized per image, ``diag(image_features @ text_features.T)`` under CUDA autocast.
- ``image_reward`` (``ImageReward.score``): one image at a time, opened from its file, its prompt tokenized per
  image, through synthmill's loading of the release network (the release's modules need fairscale and timm 0.6).
- ``pickscore`` (its README's ``calc_probs``): one prompt at a time with its image, processor, normalised
  features, ``logit_scale.exp() * (text_embs @ image_embs.T)[0]``.

``BASELINES`` holds one :class:`benchmarks.evaluate_all.Baseline` row per metric (what ``python -m benchmarks
evaluate-all`` merges into its table): tiny seeded networks in the releases' formats under the benchmark's work
folder (``synthmill.testing.preference_weights``), the spec section naming them, and the loop's mean score, which
``metrics.json`` reports under the metric's name. With ``--full-size`` they are not run: the release networks
are published checkpoints that are not on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.evaluate_all import Baseline, Bench


def hpsv2_release_loop(files: list[str], captions: list[str], section: dict[str, Any], device: str) -> np.ndarray:
    import open_clip
    import torch
    from PIL import Image

    from synthmill.metrics.hps import ARCHITECTURE, architecture_config, build, pixels

    cfg = architecture_config(section.get("architecture") or ARCHITECTURE)
    model = build(cfg, device)
    model.load_state_dict(torch.load(section["weights"], map_location=device)["state_dict"])
    model.eval()
    size = cfg["vision_cfg"]["image_size"]
    out = []
    for file, caption in zip(files, captions, strict=True):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.startswith("cuda")):
            image = pixels(Image.open(file).convert("RGB"), size).unsqueeze(0).to(device)
            text = open_clip.tokenize([caption]).to(device)
            a = model.encode_image(image, normalize=True)
            b = model.encode_text(text, normalize=True)
            out.append(torch.diagonal(a @ b.T).float().item())
    return np.asarray(out, np.float64)


def pickscore_release_loop(files: list[str], captions: list[str], section: dict[str, Any], device: str) -> np.ndarray:
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from synthmill.metrics.pickscore import RELEASE_MODEL, RELEASE_PROCESSOR

    model_name = section.get("model") or RELEASE_MODEL
    processor = AutoProcessor.from_pretrained(section.get("processor") or (
        RELEASE_PROCESSOR if section.get("model") is None else model_name))
    model = AutoModel.from_pretrained(model_name).eval().to(device)

    def features(o):  # transformers 5 returns an output object where 4.x returned the projected tensor
        return o if isinstance(o, torch.Tensor) else o.pooler_output

    out = []
    for file, prompt in zip(files, captions, strict=True):
        image_inputs = processor(images=[Image.open(file)], padding=True, truncation=True, max_length=77,
                                 return_tensors="pt").to(device)
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(device)
        with torch.no_grad():
            image_embs = features(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = features(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            out.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).item())
    return np.asarray(out, np.float64)


def image_reward_release_loop(files: list[str], captions: list[str], section: dict[str, Any],
                              device: str) -> np.ndarray:
    from PIL import Image

    from synthmill.metrics import weights
    from synthmill.metrics.imagereward import RELEASE_TOKENIZER, ImageRewardNet, read_med_config

    net = ImageRewardNet(weights.load_state_dict(section["weights"]),
                         read_med_config(section["med_config"], "image_reward.med_config"),
                         section.get("tokenizer") or RELEASE_TOKENIZER, device)
    return np.concatenate([net.scores([Image.open(file)], [caption])
                           for file, caption in zip(files, captions, strict=True)])


RELEASE_LOOPS: dict[str, Callable[[list[str], list[str], dict[str, Any], str], np.ndarray]] = {
    "hpsv2": hpsv2_release_loop,
    "image_reward": image_reward_release_loop,
    "pickscore": pickscore_release_loop,
}


# ---- the rows of the evaluate-all benchmark ----

def _section(b: Bench, metric: str) -> dict[str, Any]:
    """The spec section of ``metric`` naming its tiny seeded network, written under ``b.work`` once."""
    key = f"preference:{metric}"
    if key not in b.shared:
        from synthmill.testing import preference_weights as w

        folder = os.path.join(b.work, metric)
        if metric == "hpsv2":
            arch, weights = w.save_tiny_hps(folder, seed=1)
            b.shared[key] = {"weights": weights, "architecture": arch}
        elif metric == "image_reward":
            b.shared[key] = dict(w.save_tiny_image_reward(folder, seed=3))
        else:
            b.shared[key] = {"model": w.save_tiny_pickscore(folder, seed=2)}
    return b.shared[key]


def _row(metric: str, library: str) -> Baseline:
    def run(b: Bench) -> dict[str, float]:
        return {metric: float(RELEASE_LOOPS[metric](b.files, b.captions, _section(b, metric), b.device).mean())}

    def unavailable(b: Bench) -> str | None:
        return "the release checkpoint is not on this machine" if b.full_size else None

    return Baseline(lambda b: {metric: dict(_section(b, metric))}, run, {metric: 1e-4}, library, unavailable)


#: metric name -> its row of the evaluate-all benchmark (tolerance: tests/test_preference.py's)
BASELINES: dict[str, Baseline] = {
    "hpsv2": _row("hpsv2", "HPSv2 release loop (img_score.py)"),
    "image_reward": _row("image_reward", "ImageReward.score loop"),
    "pickscore": _row("pickscore", "PickScore calc_probs loop"),
}
