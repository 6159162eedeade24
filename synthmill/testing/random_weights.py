"""Randomly initialised metric networks saved to files, for tests and benchmarks without downloads.

The files have the layout of the real ones, so they load through the same code paths: the Inception
file is a state dict with the keys of ``pt_inception-2015-12-05-6726825d.pth`` (torchvision's
Inception v3 layout with 1008 classes, which pytorch-fid and torch-fidelity both load), and the CLIP
folder is an open_clip ``local-dir:`` model (``open_clip_config.json`` + safetensors weights).
Weights are seeded, so a file is the same on every machine.
"""

from __future__ import annotations

import json
import os


def save_random_inception(path: str, seed: int = 0) -> str:
    """Write a seeded random Inception v3 (FID layout) state dict to ``path``; return ``path``.

    Convolutions get He initialisation so activations keep their scale through the 94 layers (the
    torchvision default overflows to 1e10), and the classifier is made to spread the 1008 logits
    between images, for an Inception Score well away from 1.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    # Random pool features share a large common part; a classifier orthogonal to their mean (measured
    # on seeded noise images) and scaled to logits of spread ~4 makes class probabilities vary.
    fc, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = net.eval()(torch.rand(8, 3, 299, 299) * 2 - 1).double()
    net.fc = fc
    mean = feats.mean(0)
    w = torch.randn(1008, 2048, dtype=torch.float64)
    w -= torch.outer(w @ mean, mean) / (mean @ mean)
    w *= 4.0 / (feats @ w.T).std(0).mean()
    fc.weight.data = w.float()
    torch.nn.init.normal_(fc.bias, std=0.1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


#: A CLIP small enough for CPU tests: ViT with 2 layers of width 64 on 32px images, text tower of 2 layers.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: str, seed: int = 0) -> str:
    """Write a seeded random tiny open_clip model to ``folder``; return the ``local-dir:`` model name."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = {"model_cfg": TINY_CLIP,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    return "local-dir:" + folder
