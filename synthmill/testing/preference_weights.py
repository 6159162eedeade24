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
    from open_clip.model import CLIP

    os.makedirs(folder, exist_ok=True)
    arch = os.path.join(folder, "open_clip_config.json")
    with open(arch, "w", encoding="utf-8") as fh:
        json.dump({"model_cfg": TINY_HPS}, fh, indent=1)
    torch.manual_seed(seed)
    model = CLIP(**json.loads(json.dumps(TINY_HPS)))
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


#: A tiny ImageReward: a BLIP ViT of width 128 (two 64-wide heads) at 32 px, a 2-layer BERT of width 64.
TINY_IMAGE_REWARD = {"vision_width": 128, "vision_depth": 2, "image_size": 32, "patch_size": 8,
                     "hidden_size": 64, "layers": 2, "heads": 2, "intermediate_size": 128}
WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "man", "woman", "cat", "dog", "red", "blue", "car",
         "table", "plate", "food", "street", "sitting", "standing", "two", "people", "picture", "small", "large"]


def save_tiny_image_reward(folder: str, seed: int = 0) -> dict[str, str]:
    """A seeded random tiny ImageReward in the release's formats, in ``folder``: the checkpoint's tensors under the
    release's names (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj``/``text_proj``,
    ``mlp.layers.*``), ``med_config.json`` and a BERT tokenizer folder. Returns their paths by spec field."""
    import string

    import torch

    c = TINY_IMAGE_REWARD
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + list(string.ascii_lowercase + string.digits + string.punctuation)
             + ["##" + ch for ch in string.ascii_lowercase + string.digits] + WORDS)
    with open(os.path.join(folder, "tokenizer", "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    d, h, i_size = c["vision_width"], c["hidden_size"], c["intermediate_size"]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": h, "initializer_range": 0.02, "intermediate_size": i_size,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
           "num_attention_heads": c["heads"], "num_hidden_layers": c["layers"], "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": len(vocab) + 2, "encoder_width": d, "add_cross_attention": True}
    with open(os.path.join(folder, "med_config.json"), "w", encoding="utf-8") as fh:
        json.dump(med, fh, indent=1)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, n, state):
        state[f"{prefix}.weight"] = 1 + rand(n, std=0.1)
        state[f"{prefix}.bias"] = rand(n, std=0.1)

    def linear(prefix, n_out, n_in, state, std=0.02):
        state[f"{prefix}.weight"] = rand(n_out, n_in, std=std)
        state[f"{prefix}.bias"] = rand(n_out, std=std)

    s: dict[str, torch.Tensor] = {}
    v, grid = "blip.visual_encoder", c["image_size"] // c["patch_size"]
    s[f"{v}.cls_token"] = rand(1, 1, d)
    s[f"{v}.pos_embed"] = rand(1, grid * grid + 1, d)
    s[f"{v}.patch_embed.proj.weight"] = rand(d, 3, c["patch_size"], c["patch_size"], std=0.1)
    s[f"{v}.patch_embed.proj.bias"] = rand(d)
    for b in range(c["vision_depth"]):
        p = f"{v}.blocks.{b}"
        norm(f"{p}.norm1", d, s)
        linear(f"{p}.attn.qkv", 3 * d, d, s, std=0.1)
        linear(f"{p}.attn.proj", d, d, s, std=0.1)
        norm(f"{p}.norm2", d, s)
        linear(f"{p}.mlp.fc1", 4 * d, d, s, std=0.1)
        linear(f"{p}.mlp.fc2", d, 4 * d, s, std=0.1)
    norm(f"{v}.norm", d, s)
    t = "blip.text_encoder"
    s[f"{t}.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    s[f"{t}.embeddings.word_embeddings.weight"] = rand(len(vocab) + 2, h, std=0.5)
    s[f"{t}.embeddings.position_embeddings.weight"] = rand(512, h, std=0.1)
    norm(f"{t}.embeddings.LayerNorm", h, s)
    for n in range(c["layers"]):
        p = f"{t}.encoder.layer.{n}"
        for part, width in (("attention", h), ("crossattention", d)):
            linear(f"{p}.{part}.self.query", h, h, s, std=0.2)
            linear(f"{p}.{part}.self.key", h, width, s, std=0.2)
            linear(f"{p}.{part}.self.value", h, width, s, std=0.2)
            linear(f"{p}.{part}.output.dense", h, h, s, std=0.2)
            norm(f"{p}.{part}.output.LayerNorm", h, s)
        linear(f"{p}.intermediate.dense", i_size, h, s, std=0.2)
        linear(f"{p}.output.dense", h, i_size, s, std=0.2)
        norm(f"{p}.output.LayerNorm", h, s)
    linear("blip.vision_proj", 256, d, s)
    linear("blip.text_proj", 256, h, s)
    for layer, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, h), (128, 1024), (64, 128), (16, 64), (1, 16)),
                                    strict=True):
        linear(f"mlp.layers.{layer}", n_out, n_in, s, std=1.0 / n_in ** 0.5)
    weights = os.path.join(folder, "ImageReward.pt")
    torch.save(s, weights)
    return {"weights": weights, "med_config": os.path.join(folder, "med_config.json"),
            "tokenizer": os.path.join(folder, "tokenizer")}
