"""ImageReward (``image_reward``): the reward of each generated image with its caption.

The network is the ``image-reward`` release's (``ImageReward/ImageReward.py``), which synthmill cannot import: the
package pins timm 0.6.13 and needs fairscale, and its BLIP text encoder imports helpers transformers 5 no longer
has. Its architecture is BLIP's: a ViT (``visual_encoder``: pre-norm blocks, fused qkv with bias, exact GELU,
LayerNorm eps 1e-6, 64-dimensional heads) whose patch embeddings a BERT text encoder reads through cross-attention
in every layer (``text_encoder``, configured by ``med_config.json``), and an MLP head of five linear layers (no
activation between them) on the text's first token, standardised as ``(r - 0.16717362830052426) /
1.0333394966054072``. The modules are transformers' ports of BLIP's (``BlipVisionModel``, ``BlipTextModel``
without a pooler, bidirectional), loaded from the release checkpoint's ``blip.visual_encoder.*``,
``blip.text_encoder.*`` and ``mlp.layers.*`` tensors:

- image: torchvision ``Resize(224, bicubic)`` of the PIL image, ``CenterCrop(224)``, ``ToTensor``, OpenAI CLIP mean/std;
- caption: BERT's ``bert-base-uncased`` tokenizer with BLIP's added ``[DEC]`` and ``[ENC]`` tokens,
  ``padding="max_length", truncation=True, max_length=35``;
- float32, as the release runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from synthmill.errors import SpecError, first_line
from synthmill.metrics.base import Network
from synthmill.metrics.preference import resolve_weights, score_feature, score_metric

RELEASE = "https://huggingface.co/THUDM/ImageReward/resolve/main/ImageReward.pt"
RELEASE_MED_CONFIG = "https://huggingface.co/THUDM/ImageReward/resolve/main/med_config.json"
RELEASE_TOKENIZER = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
IMAGE_SIZE, MAX_LENGTH, HEAD_DIM = 224, 35, 64
MLP_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the release's nn.Sequential (Dropouts between them)
PROTOCOL = ("ImageReward release (ImageReward/ImageReward.py): torchvision Resize(224, bicubic) of the PIL image, "
            "CenterCrop(224), OpenAI CLIP mean/std; bert-base-uncased tokenizer with [DEC]/[ENC] added, padded and "
            "cut to 35 tokens; BLIP ViT, BERT with cross-attention to the image, MLP on the first token, "
            "(r - 0.16717362830052426) / 1.0333394966054072; float32; the mean over the generated images")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def sources(spec: Any) -> dict[str, str]:
    r = spec.image_reward
    return {"weights": r.weights or RELEASE, "med_config": r.med_config or RELEASE_MED_CONFIG,
            "tokenizer": r.tokenizer or RELEASE_TOKENIZER}


def read_med_config(path: str, field: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise SpecError(f"{field} {path}: not a readable JSON file ({first_line(e)})") from None
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in need):
        raise SpecError(f"{field} {path}: not a BERT configuration (med_config.json needs {', '.join(need)})")
    return cfg


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The release checkpoint's tensors as (transformers BlipVisionModel, BlipTextModel, head) state dicts."""
    vision, text, head = {}, {}, {}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            if k == "cls_token":
                vision["embeddings.class_embedding"] = value
            elif k == "pos_embed":
                vision["embeddings.position_embedding"] = value
            elif k.startswith("patch_embed.proj."):
                vision["embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = value
            elif k.startswith("norm."):
                vision["post_layernorm." + k.rsplit(".", 1)[1]] = value
            elif k.startswith("blocks."):
                _, i, rest = k.split(".", 2)
                module, _, leaf = rest.rpartition(".")
                vision[f"encoder.layers.{i}.{names.get(module, module)}.{leaf}"] = value
            else:
                vision[k] = value  # unknown: reported as unexpected
        elif key.startswith("blip.text_encoder."):
            k = key[len("blip.text_encoder."):]
            if k != "embeddings.position_ids":  # a buffer
                text[k] = value
        elif key.startswith("mlp.layers."):
            head[key[len("mlp.layers."):]] = value
    return vision, text, head


class ImageRewardNet:
    """The release's network from its checkpoint state, ``med_config.json`` and tokenizer."""

    def __init__(self, state: dict[str, Any], med_config: dict[str, Any], tokenizer: str | None, device: Any = "cpu",
                 check_only: bool = False):
        import torch
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from synthmill.metrics.weights import WeightsError

        vision, text, head = split_state(state)
        what = "not the weights of the ImageReward network"
        pos, patch = vision.get("embeddings.position_embedding"), vision.get("embeddings.patch_embedding.weight")
        if pos is None or patch is None or pos.ndim != 3 or patch.ndim != 4 or not text or not head:
            raise WeightsError(f"{what} (no blip.visual_encoder pos_embed / patch_embed, blip.text_encoder or "
                               "mlp.layers tensors)")
        width, p = patch.shape[0], patch.shape[-1]
        grid = math.isqrt(pos.shape[1] - 1)
        depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
        vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                                num_attention_heads=max(1, width // HEAD_DIM), image_size=grid * p, patch_size=p,
                                layer_norm_eps=1e-6, hidden_act="gelu")
        m = med_config
        tcfg = BlipTextConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                              encoder_hidden_size=width, intermediate_size=m["intermediate_size"],
                              num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
                              max_position_embeddings=m.get("max_position_embeddings", 512),
                              layer_norm_eps=m.get("layer_norm_eps", 1e-12), hidden_act=m.get("hidden_act", "gelu"),
                              pad_token_id=m.get("pad_token_id", 0), bos_token_id=None,
                              is_decoder=True)  # transformers builds the cross-attention of decoders; run bidirectional
        with torch.device("meta" if check_only else device):
            self.vision = BlipVisionModel(vcfg)
            self.text = BlipTextModel(tcfg, add_pooling_layer=False)
            sizes = [head[f"{i}.weight"].shape if f"{i}.weight" in head else None for i in MLP_LAYERS]
            if None in sizes:
                raise WeightsError(f"{what} (the MLP head needs mlp.layers.{{{','.join(map(str, MLP_LAYERS))}}})")
            self.head = torch.nn.Sequential(*(torch.nn.Linear(s[1], s[0]) for s in sizes))
        head = {f"{j}.{leaf}": head[f"{i}.{leaf}"] for j, i in enumerate(MLP_LAYERS) for leaf in ("weight", "bias")}
        for module, sd, name in ((self.vision, vision, "blip.visual_encoder"), (self.text, text, "blip.text_encoder"),
                                 (self.head, head, "mlp.layers")):
            want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            have = {k: tuple(v.shape) for k, v in sd.items()}
            if want != have:
                missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
                why = (f"{len(missing)} keys missing, e.g. {missing[0]}" if missing else
                       f"{len(extra)} unexpected keys, e.g. {extra[0]}" if extra else
                       next(f"{k} has shape {list(have[k])}, the network's is {list(want[k])}"
                            for k in want if want[k] != have[k]))
                raise WeightsError(f"{what} ({name}: {why})")
            if not check_only:
                module.load_state_dict(sd, strict=True)
                module.eval().requires_grad_(False)
        if check_only:
            return
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
        from transformers import BertTokenizer

        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        size = grid * p
        self.preprocess = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                                   lambda im: im.convert("RGB"), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])
        self.device, self.torch = device, torch

    def scores(self, images: list[Any], captions: list[str]) -> np.ndarray:
        """float64 ImageReward of each PIL image with its caption."""
        torch = self.torch
        text = self.tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            image_embeds = self.vision(pixel_values=x).last_hidden_state
            atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            out = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                            encoder_hidden_states=image_embeds, encoder_attention_mask=atts, is_decoder=False)
            r = self.head(out.last_hidden_state[:, 0, :].float())[:, 0]
        return ((r - MEAN) / STD).double().cpu().numpy()


class _Net:
    def __init__(self, spec: Any, info: dict[str, Any], features: tuple[str, ...], device: str):
        from synthmill.metrics import weights

        path, _ = weights.resolve(info["weights"], info["sha256"], spec.storage)
        med, _ = weights.resolve(info["med_config"], info["med_config_sha256"], spec.storage)
        self.net = ImageRewardNet(weights.load_state_dict(path), read_med_config(med, "image_reward.med_config"),
                                  info["tokenizer"], device)

    def extract(self, features: tuple[str, ...], images: list[Any], captions: list[str]) -> dict[str, Any]:
        return {"image_reward": self.net.scores(images, captions)}


def _check_network(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    import os

    from synthmill.metrics import weights
    from synthmill.models.loading import is_hub_id

    src = sources(spec)
    med, med_sha = resolve_weights("image_reward.med_config", src["med_config"], None, opts)
    cfg = read_med_config(med, "image_reward.med_config")
    path, sha = resolve_weights("image_reward.weights", src["weights"], spec.image_reward.weights_sha256, opts)
    try:
        ImageRewardNet(weights.load_state_dict(path), cfg, None, check_only=True)
    except weights.WeightsError as e:
        raise SpecError(f"image_reward.weights: {path}: {e}") from None
    tok = src["tokenizer"]
    if os.path.isdir(tok):
        if not os.path.isfile(os.path.join(tok, "vocab.txt")):
            raise SpecError(f"image_reward.tokenizer {tok}: no vocab.txt (a BERT tokenizer folder is needed)")
    elif not is_hub_id(tok):
        raise SpecError(f"image_reward.tokenizer {tok}: neither a BERT tokenizer folder nor a hub id")
    return {"weights": src["weights"], "sha256": sha, "path": path, "med_config": src["med_config"],
            "med_config_sha256": med_sha, "tokenizer": tok}


def _describe(spec: Any) -> dict[str, Any]:
    return {**sources(spec), "weights_sha256": spec.image_reward.weights_sha256, "score": PROTOCOL}


NETWORK = Network("image_reward", load=_Net, prepare=lambda spec, image: image, check=_check_network,
                  captions="the image_reward metric scores each image against its caption")
SCORES = score_feature("image_reward")
IMAGE_REWARD = score_metric("image_reward", _describe, _describe)
