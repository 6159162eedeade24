"""Tiny seeded preference networks saved in their releases' formats, for tests and benchmarks without downloads.

- HPSv2: an open_clip configuration file (``hpsv2.architecture``) and a ``torch.save({"state_dict": ...})``
  checkpoint of that CLIP, the layout of ``HPS_v2.1_compressed.pt``.
- PickScore: a transformers ``CLIPModel`` and ``CLIPProcessor`` saved with ``save_pretrained`` in one folder, the
  layout of ``yuvalkirstain/PickScore_v1`` (with the processor beside it); its tokenizer is a byte-level BPE
  vocabulary of single characters and a few merges.
"""

from __future__ import annotations

import json
import os

#: A tiny open_clip CLIP at 48 px, so that 32 px images are resized as the release resizes them.
TINY_HPS = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 12, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_hps(folder: str, seed: int = 0) -> tuple[str, str]:
    """(architecture JSON file, checkpoint file) of a seeded random tiny HPS network in ``folder``."""
    import torch

    from synthmill.metrics.hps import build

    os.makedirs(folder, exist_ok=True)
    arch = os.path.join(folder, "open_clip_config.json")
    with open(arch, "w", encoding="utf-8") as fh:
        json.dump({"model_cfg": TINY_HPS}, fh, indent=1)
    torch.manual_seed(seed)
    model = build(TINY_HPS)
    weights = os.path.join(folder, "HPS_tiny.pt")
    torch.save({"state_dict": model.state_dict()}, weights)
    return arch, weights


def save_tiny_pickscore(folder: str, seed: int = 0) -> str:
    """A seeded random tiny transformers CLIP with its processor (40 px), saved in ``folder``; returns ``folder``."""
    import torch
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "a r"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    bpe = os.path.join(folder, "bpe")
    os.makedirs(bpe, exist_ok=True)
    with open(os.path.join(bpe, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({t: i for i, t in enumerate(vocab)}, fh)
    with open(os.path.join(bpe, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(bpe, "vocab.json"), os.path.join(bpe, "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    n = len(vocab)
    config = CLIPConfig(
        text_config={"vocab_size": n, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": n - 2,
                     "eos_token_id": n - 1, "pad_token_id": n - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 40, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    return folder
