"""How users compute KID, precision/recall and CMMD today, one tool after another: the baselines of a
single-pass evaluation, keyed by metric name.

Each ``BASELINES[name](generated, reference, settings)`` reads two folders of images itself and returns the
numbers under the names ``metrics.json`` gives them, so a benchmark can time it and compare:

- ``kid`` and ``precision_recall``: ``torch_fidelity.calculate_metrics`` on the folders, one call each (as
  ``fidelity --kid`` and ``fidelity --prc`` are run), with the Inception file of ``settings["weights"]``;
  precision/recall asked for on the Inception features synthmill uses (torch-fidelity's default for prc alone
  is VGG-16).
- ``cmmd``: open_clip image embeddings of each folder, then the reference code's formula over whole kernel
  matrices (google-research/cmmd ``distance.mmd``), and the paper's unbiased form.

``settings`` holds ``weights`` (the Inception file), ``kid`` ({subsets, subset_size}), ``neighborhood``,
``cmmd_model``, ``cmmd_pretrained``, ``cuda`` (bool) and ``batch_size``; missing keys take the spec's defaults.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _fidelity(generated: str, reference: str, settings: dict[str, Any], **metrics: Any) -> dict[str, Any]:
    import torch_fidelity

    ext = next((e for e in IMAGE_EXTENSIONS if glob.glob(os.path.join(generated, f"*.{e}"))), "png")
    return torch_fidelity.calculate_metrics(
        input1=generated, input2=reference, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=settings.get("weights"), cuda=bool(settings.get("cuda", False)),
        batch_size=int(settings.get("batch_size", 64)), cache=False, verbose=False, samples_find_ext=ext, **metrics)


def kid(generated: str, reference: str, settings: dict[str, Any]) -> dict[str, float]:
    k = settings.get("kid", {})
    out = _fidelity(generated, reference, settings, kid=True, kid_subsets=int(k.get("subsets", 100)),
                    kid_subset_size=int(k.get("subset_size", 1000)))
    return {"kid": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"]}


def precision_recall(generated: str, reference: str, settings: dict[str, Any]) -> dict[str, float]:
    out = _fidelity(generated, reference, settings, prc=True, prc_neighborhood=int(settings.get("neighborhood", 3)))
    return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}


def _embeddings(folder: str, model: Any, preprocess: Any, device: str, batch_size: int) -> np.ndarray:
    import torch
    from PIL import Image

    files = sorted(f for e in IMAGE_EXTENSIONS for f in glob.glob(os.path.join(folder, f"*.{e}")))
    out = []
    for lo in range(0, len(files), batch_size):
        pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[lo:lo + batch_size]])
        with torch.inference_mode():
            out.append(model.encode_image(pixels.to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def cmmd(generated: str, reference: str, settings: dict[str, Any]) -> dict[str, float]:
    import open_clip

    device = "cuda" if settings.get("cuda") else "cpu"
    model, _, preprocess = open_clip.create_model_and_transforms(
        settings.get("cmmd_model", "ViT-L-14-336"), pretrained=settings.get("cmmd_pretrained", "openai"), device=device)
    model.eval()
    bs = int(settings.get("batch_size", 64))
    x, y = (_embeddings(f, model, preprocess, device, bs) for f in (generated, reference))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T) / (2 * 10.0 ** 2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return {"cmmd": float(1000 * (kxx.mean() + kyy.mean() - 2 * kxy.mean())),
            "cmmd_unbiased": float(1000 * ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                                           + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()))}


BASELINES: dict[str, Callable[[str, str, dict[str, Any]], dict[str, float]]] = {
    "kid": kid,
    "precision_recall": precision_recall,
    "cmmd": cmmd,
}
