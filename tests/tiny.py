"""Tiny diffusers models and pipelines built from configs with random weights (no download)."""
from __future__ import annotations

import torch

SD1_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

SD2_UNET = dict(
    SD1_UNET,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
)

SDXL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=8,
)

ARCHS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}


def unet(arch: str = "sd1", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**ARCHS[arch]).eval()


def unet_inputs(arch: str, batch: int = 2, size: int = 16, seed: int = 1, dtype=torch.float32):
    """(args, kwargs) of one UNet call: latent [batch, 4, size, size], timestep, text states."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    text = torch.randn(batch, 7, 32, generator=g, dtype=dtype)
    kwargs = dict(encoder_hidden_states=text)
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 32, generator=g, dtype=dtype),
            time_ids=torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=dtype).repeat(batch, 1),
        )
    return (sample, torch.tensor(500)), kwargs
