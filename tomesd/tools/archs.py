"""Built-in UNet architectures for benchmarking: diffusers UNet2DConditionModel configs as dicts.

Speed and memory do not depend on the weights, so `python -m tomesd.bench --arch NAME` builds these
with random weights and downloads nothing. sd15, sd21 and sdxl are the `unet/config.json` of
Stable Diffusion 1.5, 2.1 and XL 1.0 base (the keys that differ from UNet2DConditionModel's defaults);
`tiny` is a toy: SD 1.5's layout (four levels, attention at /1, /2, /4) at 1/10 width, for quick
checks. Attention dominates it far more than SD 1.5, so ToMe's speed-ups on it are much larger (2.1x
at ratio 0.5 and 512 px on a CPU, against 1.05-1.2x for the real SD 1.5 UNet; see BENCHMARKS.md).

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


@dataclass(frozen=True)
class TransformerArch:
    """An MMDiT (SD 3 / 3.5, Flux) transformer: `family` "sd3" (SD3Transformer2DModel(**config)) or
    "flux" (FluxTransformer2DModel(**config)). text_len: text tokens of encoder_hidden_states (SD 3.5:
    77 CLIP + 256 T5; Flux: 512 T5). depth_key(s): the config keys counting its blocks, which
    `build_transformer(..., layers=k)` cuts to k each (every block runs at the full token grid, so a
    cut model keeps the per-block cost and ToMe's per-block speed-up, in less time and memory)."""

    name: str
    description: str
    family: str
    config: Dict[str, Any] = field(repr=False)
    text_len: int
    depth_keys: tuple = ()
    toy: bool = False


SD35M = TransformerArch(
    "sd3",
    "Stable Diffusion 3.5 Medium transformer (MMDiT, 2.5B parameters; dual attention in blocks 0-12)",
    "sd3",
    dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
         out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    text_len=333,
    depth_keys=("num_layers",),
)

FLUX_DEV = TransformerArch(
    "flux",
    "Flux.1 dev transformer (12B parameters: 19 double-stream, 38 single-stream blocks)",
    "flux",
    dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
         axes_dims_rope=(16, 56, 56)),
    text_len=512,
    depth_keys=("num_layers", "num_single_layers"),
)

TRANSFORMER_ARCHS: Dict[str, TransformerArch] = {a.name: a for a in (SD35M, FLUX_DEV)}


def build_transformer(arch: TransformerArch, layers=None):
    """The transformer of `arch` with random weights; `layers`: keep this many blocks of each kind."""
    config = dict(arch.config)
    if layers is not None:
        for key in arch.depth_keys:
            config[key] = min(config[key], layers)
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
    if arch.family == "sd3":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(**config)
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config)


def transformer_inputs(arch: TransformerArch, batch: int, height_px: int, width_px: int, dtype, device,
                       vae_scale_factor: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Keyword arguments of one denoiser call of `arch` for an image of height_px × width_px."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = height_px // vae_scale_factor, width_px // vae_scale_factor
    c = arch.config
    text = torch.randn(batch, arch.text_len, c["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, c["pooled_projection_dim"], generator=g)
    if arch.family == "sd3":
        kwargs = dict(hidden_states=torch.randn(batch, c["in_channels"], h, w, generator=g),
                      encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((batch,), 500.0))
    else:
        gh, gw = h // 2, w // 2  # Flux packs 2×2 latent patches into one token
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] = torch.arange(gh)[:, None]
        ids[..., 2] = torch.arange(gw)[None, :]
        kwargs = dict(hidden_states=torch.randn(batch, gh * gw, c["in_channels"], generator=g),
                      encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((batch,), 0.5),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(arch.text_len, 3),
                      guidance=torch.full((batch,), 3.5) if c.get("guidance_embeds") else None)
    return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
