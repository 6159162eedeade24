"""How users compute KID, precision/recall and CMMD today, one tool after another: the baselines of a
single-pass evaluation, keyed by metric name.

``BASELINES`` holds one :class:`benchmarks.evaluate_all.Baseline` row per metric (what ``python -m benchmarks
evaluate-all`` merges into its table): the evaluate spec's sections synthmill's job needs, and a run of the
function below on the benchmark's two folders. Each function ``kid`` / ``precision_recall`` / ``cmmd``
``(generated, reference, settings)`` reads two folders of images itself and returns the numbers under the names
``metrics.json`` gives them, so a benchmark can time it and compare:

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
from typing import Any

import numpy as np

from benchmarks.evaluate_all import Baseline, Bench

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


# ---- the rows of the evaluate-all benchmark ----

def _kid_section(b: Bench) -> dict[str, int]:
    """torch-fidelity's 100 subsets of 1000, the subsets no larger than the smaller set."""
    return {"subsets": 100, "subset_size": min(1000, len(b.files), len(b.reference_files))}


def _settings(b: Bench) -> dict[str, Any]:
    return {"weights": b.inception_weights(), "kid": _kid_section(b), "neighborhood": 3, "cuda": b.device == "cuda",
            "batch_size": b.batch}


def _inception_spec(b: Bench, section: str, value: dict[str, Any]) -> dict[str, Any]:
    # KID and precision/recall read the features of the Inception file IS and FID use (fid.weights)
    return {"reference": {"path": b.reference}, "fid": {"weights": b.inception_weights()}, section: value}


def _cmmd_model(b: Bench) -> tuple[str, str | None]:
    """(model, pretrained): a tiny local-dir CLIP, or the paper's ViT-L-14-336 with seeded random weights."""
    if "cmmd" not in b.shared:
        if b.full_size:
            import open_clip
            import torch

            torch.manual_seed(0)
            path = os.path.join(b.work, "vit-l-14-336.pt")
            torch.save(open_clip.create_model("ViT-L-14-336").state_dict(), path)
            b.shared["cmmd"] = ("ViT-L-14-336", path)
        else:
            from synthmill.testing.random_weights import save_tiny_clip

            b.shared["cmmd"] = (save_tiny_clip(os.path.join(b.work, "cmmd-clip"), seed=1), None)
    return b.shared["cmmd"]


def _cmmd_spec(b: Bench) -> dict[str, Any]:
    model, pretrained = _cmmd_model(b)
    return {"reference": {"path": b.reference}, "cmmd": {"model": model, "pretrained": pretrained}}


def _cmmd_run(b: Bench) -> dict[str, float]:
    model, pretrained = _cmmd_model(b)
    return cmmd(b.generated, b.reference, {**_settings(b), "cmmd_model": model, "cmmd_pretrained": pretrained})


#: metric name -> its row of the evaluate-all benchmark (tolerances: tests/test_metrics_more.py's)
BASELINES: dict[str, Baseline] = {
    "kid": Baseline(lambda b: _inception_spec(b, "kid", _kid_section(b)),
                    lambda b: kid(b.generated, b.reference, _settings(b)),
                    {"kid": 1e-3, "kid_std": 1e-2}, "torch-fidelity (kid)"),
    "precision_recall": Baseline(lambda b: _inception_spec(b, "precision_recall", {"neighborhood": 3}),
                                 lambda b: precision_recall(b.generated, b.reference, _settings(b)),
                                 {"precision": 0.0, "recall": 0.0, "f_score": 0.0}, "torch-fidelity (prc)"),
    "cmmd": Baseline(_cmmd_spec, _cmmd_run, {"cmmd": 1e-6, "cmmd_unbiased": 1e-6},
                     "open_clip + google-research/cmmd formula"),
}
