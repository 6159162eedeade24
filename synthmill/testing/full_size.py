"""Full-size text-to-image pipelines with random weights, built from configs kept in this repository.

Throughput depends on layouts, not on weight values, so a GPU machine with no hub access can still
measure images/s for the real architectures. Each component follows the hub file it is named after:

* ``sd15``: SD v1.x (``CompVis/stable-diffusion-v1-4``, ``runwayml/stable-diffusion-v1-5``): the
  859.5M-parameter UNet of :mod:`synthmill.testing.unet_configs`, the 83.7M-parameter KL VAE, CLIP
  ViT-L/14's 123.1M-parameter text tower, PNDM.
* ``sdxl``: ``stabilityai/stable-diffusion-xl-base-1.0``: the 2.57B-parameter UNet, the same VAE layout
  with SDXL's scaling factor and ``force_upcast`` (decoded in float32, as diffusers does for it), CLIP
  ViT-L/14 and OpenCLIP ViT-bigG/14's 694.7M-parameter text tower with its projection, Euler.
* ``ssd-1b``: ``segmind/SSD-1B``: SDXL with the 1.33B-parameter student UNet of
  :func:`synthmill.models.students.student_config`.

The tokenizer is the byte-level CLIP tokenizer of :mod:`synthmill.testing.tiny` (prompts still pad to 77
tokens, so every text encoder does its real amount of work); the embedding tables keep CLIP's 49,408 rows,
so parameter counts are the published ones.
"""

from __future__ import annotations

import os
from typing import Any

FULL_SIZE_ARCHS = ("sd15", "sdxl", "ssd-1b")
_CLIP_VOCAB = 49408
_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def vae_config(arch: str) -> dict[str, Any]:
    """The KL VAE of SD v1.x and SDXL (same layout; SDXL scales latents differently and upcasts)."""
    sdxl = arch != "sd15"
    return dict(
        block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, act_fn="silu",
        sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl,
    )


def text_encoder_config(which: str) -> dict[str, Any]:
    """``vit-l``: CLIP ViT-L/14's text tower (SD v1.x; SDXL's first); ``vit-bigg``: OpenCLIP's (SDXL's second)."""
    # the ids are the byte-level tokenizer's
    ids = dict(vocab_size=_CLIP_VOCAB, bos_token_id=512, eos_token_id=513, pad_token_id=513,
               max_position_embeddings=77, layer_norm_eps=1e-05)
    if which == "vit-l":
        return dict(ids, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu", projection_dim=768)
    if which == "vit-bigg":
        return dict(ids, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    hidden_act="gelu", projection_dim=1280)
    raise ValueError(f"unknown text encoder {which!r}; known: vit-l, vit-bigg")


def unet_config(arch: str) -> dict[str, Any]:
    from synthmill.models.students import student_config
    from synthmill.testing.unet_configs import get_unet_config

    if arch == "sd15":
        return get_unet_config("sd-v1.4")
    if arch == "sdxl":
        return get_unet_config("sdxl-base-1.0")
    if arch == "ssd-1b":
        return student_config(get_unet_config("sdxl-base-1.0"), "ssd-1b")
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(FULL_SIZE_ARCHS)}")


def build_random_pipeline(arch: str, seed: int = 0, device: Any = "cpu", dtype: Any = None):
    """The pipeline ``arch`` with seeded random weights, created on ``device`` (then cast to ``dtype``).

    ``device="meta"`` allocates nothing (parameter counts only); ``"cuda"`` initialises on the GPU (fast).
    """
    import tempfile

    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from synthmill.testing.tiny import write_tiny_clip_tokenizer

    unet_cfg = unet_config(arch)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**vae_config(arch))
        text = CLIPTextModel(CLIPTextConfig(**text_encoder_config("vit-l")))
        text_2 = (None if arch == "sd15"
                  else CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_config("vit-bigg"))))
    if text_2 is None:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
            scheduler=diffusers.PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True)
    return pipe if dtype is None else pipe.to(dtype=dtype)


def save_random_pipeline(folder: str | os.PathLike, arch: str, seed: int = 0, device: Any = "cpu",
                         dtype: Any = None) -> str:
    """Build :func:`build_random_pipeline` and ``save_pretrained`` it (safetensors) to ``folder``."""
    pipe = build_random_pipeline(arch, seed, device, dtype)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
