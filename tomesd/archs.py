"""Built-in UNet architectures for benchmarking: diffusers UNet2DConditionModel configs as dicts.

Speed and memory do not depend on the weights, so `python -m tomesd.bench --arch NAME` builds these
with random weights and downloads nothing. sd15, sd21 and sdxl are the `unet/config.json` of
Stable Diffusion 1.5, 2.1 and XL 1.0 base (the keys that differ from UNet2DConditionModel's defaults);
`tiny` is a toy: SD 1.5's layout (four levels, attention at /1, /2, /4) at 1/10 width, for quick
checks. Attention dominates it far more than SD 1.5, so ToMe's speed-ups on it are much larger (2.1x
at ratio 0.5 and 512 px on a CPU, against about 1.2x for the real SD 1.5 UNet).

Each entry also says what the UNet is called with: the text sequence length and, for SDXL, the
size of the pooled text embedding that goes with the six time ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class Arch:
    """config: UNet2DConditionModel(**config). text_len: tokens of encoder_hidden_states.
    toy: not a real model's shape (its speed-ups must not be read as a real model's)."""

    name: str
    description: str
    config: Dict[str, Any] = field(repr=False)
    text_len: int = 77
    toy: bool = False


SD15 = Arch(
    "sd15",
    "Stable Diffusion 1.5 UNet (860M parameters)",
    dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=_SD_DOWN,
        up_block_types=_SD_UP,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
)

SD21 = Arch(
    "sd21",
    "Stable Diffusion 2.1 UNet (865M parameters, 768 px)",
    dict(
        SD15.config,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
)

SDXL = Arch(
    "sdxl",
    "Stable Diffusion XL 1.0 base UNet (2.6B parameters, 1024 px)",
    dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids × 256 + 1280 pooled text
        norm_num_groups=32,
    ),
)

TINY = Arch(
    "tiny",
    "TOY: SD 1.5 layout at 1/10 width (quick checks; its speed-ups are larger than SD 1.5's)",
    dict(
        SD15.config,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    ),
    toy=True,
)

ARCHS: Dict[str, Arch] = {a.name: a for a in (SD15, SD21, SDXL, TINY)}
