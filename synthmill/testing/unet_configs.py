"""Full-size UNet configs of the public teachers, as plain Python dicts (no hub access needed).

These are the values of the hub files, written out so that layouts can be planned and benchmarked with
random weights on machines that cannot reach the hub:

* ``sd-v1.4``: ``CompVis/stable-diffusion-v1-4`` ``unet/config.json`` (859,520,964 parameters; SD v1.5
  shares the layout).
* ``sdxl-base-1.0``: ``stabilityai/stable-diffusion-xl-base-1.0`` ``unet/config.json`` (2,567,463,684
  parameters).

Only the keys of the hub files are listed (SD v1.4's file predates most options, which then take diffusers'
defaults). :func:`get_unet_config` hands out a deep copy, so callers may edit it freely;
:func:`build_unet` builds the model, on the meta device by default (no memory, parameter counts only).
"""

from __future__ import annotations

import copy
from typing import Any

SD_V1_4_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SDXL_BASE_1_0_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

#: Named full-size configs: name -> (config, hub repository it comes from, parameter count).
UNET_CONFIGS: dict[str, tuple[dict[str, Any], str, int]] = {
    "sd-v1.4": (SD_V1_4_UNET_CONFIG, "CompVis/stable-diffusion-v1-4", 859_520_964),
    "sdxl-base-1.0": (SDXL_BASE_1_0_UNET_CONFIG, "stabilityai/stable-diffusion-xl-base-1.0", 2_567_463_684),
}


def get_unet_config(name: str) -> dict[str, Any]:
    """A deep copy of the named full-size UNet config (``sd-v1.4`` or ``sdxl-base-1.0``)."""
    try:
        cfg = UNET_CONFIGS[name][0]
    except KeyError:
        raise ValueError(f"unknown UNet config {name!r}; known: {', '.join(UNET_CONFIGS)}") from None
    return copy.deepcopy(cfg)


def build_unet(name_or_config: str | dict[str, Any], *, device: Any = "meta", dtype: Any = None):
    """Build a ``UNet2DConditionModel`` with random weights from a named config (or a config dict).

    ``device="meta"`` (the default) allocates nothing: the model has its full layout, so parameter counts
    can be read, but no values. Pass ``device="cuda"`` (or ``"cpu"``) for a real, randomly initialised model.
    """
    import torch
    from diffusers import UNet2DConditionModel

    cfg = get_unet_config(name_or_config) if isinstance(name_or_config, str) else copy.deepcopy(name_or_config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg)
    if dtype is not None:
        unet = unet.to(dtype=dtype)
    return unet.eval()
