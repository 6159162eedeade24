"""Tiny, seeded diffusers pipelines built in code, for tests and CPU benchmarks.

Nothing here touches a hub: the CLIP tokenizer is written from a byte-level vocabulary (every byte
is a token, so long prompts really do exceed the 77-token window), and every weight comes from
``torch.manual_seed``. :func:`save_tiny_pipeline` writes an ordinary diffusers folder, so callers load it
back through the same ``DiffusionPipeline.from_pretrained`` path that a hub id takes.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The architectures this module can build: ``sd`` (SD 1.x/2.x layout) and ``sdxl`` (two text encoders).
TINY_KINDS = ("sd", "sdxl")

#: UNet layouts: ``small`` (2 stages, the fastest thing that runs) or ``full`` (the block structure of the
#: real SD 1.x / SDXL UNet at tiny widths, so every student layout of models/students.py can be cut from it).
TINY_UNET_LAYOUTS = ("small", "full")


def tiny_unet_config(kind: str) -> dict:
    """A UNet config with the full SD 1.x (``sd``) or SDXL (``sdxl``) block structure at tiny widths.

    SD 1.x: four stages (three with cross-attention, the last a plain ``DownBlock2D``), two layers per
    block, a cross-attention mid block. SDXL: three stages (the first without attention), per-stage
    transformer depths 1/2/10 (so the Segmind layouts, which keep 4 or 2 of the deepest 10, apply), the
    ``text_time`` micro-conditioning of the SDXL UNet.
    """
    if kind == "sd":
        return {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64, 64, 64),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        }
    if kind == "sdxl":
        return {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (2, 4, 4),
            "use_linear_projection": True,
            "cross_attention_dim": 32,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 8,
        }
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; known: {', '.join(TINY_KINDS)}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tiny_clip_tokenizer(folder: str | os.PathLike) -> None:
    """Write a CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (plus word-final forms)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(str(folder))


def _text_encoder(with_projection: bool, hidden: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=514,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def build_tiny_pipeline(kind: str = "sd", seed: int = 0, unet_layout: str = "small"):
    """Return a tiny randomly initialised text-to-image pipeline (``sd`` or ``sdxl``) on the CPU.

    ``unet_layout="full"`` gives the UNet of :func:`tiny_unet_config` (a teacher that distill jobs can cut
    students from); ``small`` a 2-stage UNet (fastest for generate and evaluate tests).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; known: {', '.join(TINY_KINDS)}")
    if unet_layout not in TINY_UNET_LAYOUTS:
        raise ValueError(f"unknown tiny UNet layout {unet_layout!r}; known: {', '.join(TINY_UNET_LAYOUTS)}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    layout = dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    if unet_layout == "full":
        cfg = tiny_unet_config(kind)
        if kind == "sdxl":
            cfg["cross_attention_dim"] = 64  # the two 32-wide text encoders, concatenated
        unet = UNet2DConditionModel(**cfg)
    elif kind == "sd":
        unet = UNet2DConditionModel(**layout, cross_attention_dim=32, attention_head_dim=4)
    else:
        unet = UNet2DConditionModel(
            **layout,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
        )
    if kind == "sd":
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
            steps_offset=1, set_alpha_to_one=False,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=_text_encoder(False, 32, seed + 2),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # SDXL: two text encoders (the second with a projection), micro-conditioning on sizes.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=_text_encoder(False, 32, seed + 2),
        text_encoder_2=_text_encoder(True, 32, seed + 3),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_pipeline(folder: str | os.PathLike, kind: str = "sd", seed: int = 0, unet_layout: str = "small") -> str:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors) to ``folder``; return the path."""
    pipe = build_tiny_pipeline(kind, seed, unet_layout)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def save_tiny_unet(folder: str | os.PathLike, kind: str = "sd", seed: int = 1, unet_layout: str = "small") -> str:
    """The UNet of a tiny pipeline of another ``seed``, saved as a diffusers UNet folder (for ``model.unet``)."""
    build_tiny_pipeline(kind, seed, unet_layout).unet.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def save_tiny_lora(folder: str | os.PathLike, pipeline: str | os.PathLike, seed: int = 0, rank: int = 4) -> str:
    """LoRA adapters (peft) of rank ``rank`` on the attention projections of the UNet of the pipeline folder
    ``pipeline``, with random non-zero A and B (a fresh LoRA's B is zero: it would change nothing), saved with the
    pipeline class's ``save_lora_weights`` as ``folder/pytorch_lora_weights.safetensors``; return ``folder``."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(pipeline))
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return str(folder)
