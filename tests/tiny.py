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
    projection_class_embeddings_input_dim=8 * 6 + 16,  # time ids + text_encoder_2's 16-dim pooled output
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
            text_embeds=torch.randn(batch, 16, generator=g, dtype=dtype),
            time_ids=torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=dtype).repeat(batch, 1),
        )
    return (sample, torch.tensor(500)), kwargs


def run(model, arch: str = "sd1", batch: int = 2, size: int = 16, seed: int = 1, width=None, timestep=500):
    """One no-grad UNet call on unet_inputs (a size × width latent where width is given) at `timestep` (a
    number, or a tensor of per-sample timesteps): the output sample."""
    args, kwargs = unet_inputs(arch, batch=batch, size=size, seed=seed)
    sample = args[0]
    if width is not None:
        sample = torch.randn(batch, 4, size, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(sample, torch.as_tensor(timestep), **kwargs).sample


VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
)


def tokenizer(directory):
    """A CLIP BPE tokenizer over single letters, written to `directory` (no download)."""
    import json
    import os

    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters])}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), model_max_length=16, pad_token="!")


def text_encoder(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def pipeline(arch: str, directory):
    """A tiny StableDiffusionPipeline (sd1, sd2) or StableDiffusionXLPipeline (sdxl) with random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    torch.manual_seed(0)
    parts = dict(
        unet=unet(arch),
        vae=AutoencoderKL(**VAE).eval(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        tokenizer=tokenizer(directory),
    )
    if arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        # Two 16-dim encoders: the UNet sees 16 + 16 = 32 text channels and a 16-dim pooled embedding.
        return StableDiffusionXLPipeline(
            text_encoder=text_encoder(16), text_encoder_2=text_encoder(16, projection=True, seed=1),
            tokenizer_2=parts["tokenizer"], **parts,
        )
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        text_encoder=text_encoder(32), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **parts,
    )


# --- compatibility helpers (tests/test_compat*.py) ---

_VIDEO_BASE = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   norm_num_groups=8)

MOTION_UNET = dict(
    _VIDEO_BASE,
    down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    num_attention_heads=2,
    motion_num_attention_heads=2,
    motion_max_seq_length=8,
)

UNET_3D = dict(
    _VIDEO_BASE,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    attention_head_dim=8,
)


def video_unet(kind: str, seed: int = 0):
    """A tiny UNetMotionModel ("motion", AnimateDiff) or UNet3DConditionModel ("3d")."""
    from diffusers import UNet3DConditionModel, UNetMotionModel

    torch.manual_seed(seed)
    if kind == "motion":
        return UNetMotionModel(**MOTION_UNET).eval()
    return UNet3DConditionModel(**UNET_3D).eval()


def video_inputs(kind: str, batch: int = 2, frames: int = 3, size: int = 16, seed: int = 1):
    """Keyword arguments of one video UNet call: latent [batch, 4, frames, size, size].

    UNetMotionModel takes text states per frame (AnimateDiffPipeline repeats them), UNet3DConditionModel per video.
    """
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, 32, generator=g)
    return dict(sample=torch.randn(batch, 4, frames, size, size, generator=g), timestep=torch.tensor(500),
                encoder_hidden_states=text.repeat_interleave(frames, dim=0) if kind == "motion" else text)


def pixart(seed: int = 0, patch_size: int = 2):
    """A tiny PixArtTransformer2DModel (ada_norm_single blocks behind a patch embedding)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=24, sample_size=16, patch_size=patch_size,
        norm_num_groups=8, use_additional_conditions=False,
    ).eval()


def pixart_inputs(batch: int = 2, size: int = 16, seed: int = 1):
    """Keyword arguments of one PixArt call, as PixArtAlphaPipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 24, generator=g), timestep=torch.tensor([500] * batch),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def dit_pipeline(seed: int = 0):
    """A tiny DiTPipeline: class-conditional DiTTransformer2DModel (patch size 2) exposed as `.transformer`."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8,  # 1000: the null class of CFG
    ).eval()
    return DiTPipeline(transformer=transformer, vae=AutoencoderKL(**VAE).eval(), scheduler=DDIMScheduler())


class GridBlock(torch.nn.Module):
    """A latent [B, C, H, W] → its H·W tokens [B, H·W, C] → one BasicTransformerBlock(**block_kwargs).

    The smallest denoiser around a block: forward(sample, **block_call_kwargs) returns the block's tokens.
    """

    def __init__(self, **block_kwargs):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.block = BasicTransformerBlock(**block_kwargs)

    def forward(self, sample, **kwargs):
        return self.block(sample.flatten(2).transpose(1, 2), **kwargs)


def controlnet_pipeline(directory):
    """A tiny StableDiffusionControlNetPipeline whose ControlNet is built from the SD1 UNet.

    The tiny VAE halves the image once, so the control image's embedding downsamples once too.
    """
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    base = unet("sd1")
    net = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(8, 8)).eval()
    with torch.no_grad():  # diffusers zero-inits the output convs: make the residuals matter
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.normal_(std=0.05)
    return StableDiffusionControlNetPipeline(
        unet=base, controlnet=net,
        vae=AutoencoderKL(**VAE).eval(), text_encoder=text_encoder(32), tokenizer=tokenizer(directory),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --- MMDiT helpers (tests/test_mmdit.py) ---

SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                       pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,),
                       qk_norm="rms_norm")
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3_TRANSFORMER).eval()


def sd3_inputs(batch: int = 2, size: int = 16, seed: int = 1, width=None):
    """kwargs of one SD3Transformer2DModel call: latent [batch, 4, size, width or size], 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, size, width or size, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 500.0))


def flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_TRANSFORMER).eval()


def flux_inputs(batch: int = 2, grid: int = 8, seed: int = 1, width=None):
    """kwargs of one FluxTransformer2DModel call: grid × (width or grid) packed tokens, 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid, width or grid
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))


def _tiny_t5(seed: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2)).eval()


def mmdit_pipeline(kind: str, directory):
    """A tiny StableDiffusion3Pipeline or FluxPipeline with random weights: tiny CLIP and T5 encoders,
    the letter tokenizer for all of them (no download)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(VAE, shift_factor=0.0, scaling_factor=1.0)).eval()
    tok = tokenizer(directory)
    if kind == "sd3":
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=sd3(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=text_encoder(16, projection=True), tokenizer=tok,
            text_encoder_2=text_encoder(16, projection=True, seed=1), tokenizer_2=tok,
            text_encoder_3=_tiny_t5(), tokenizer_3=tok,
        )
    from diffusers import FluxPipeline

    return FluxPipeline(transformer=flux(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=text_encoder(16), tokenizer=tok, text_encoder_2=_tiny_t5(), tokenizer_2=tok)


def grid_ids(h: int, w: int, first: float = 0, row0: int = 0, col0: int = 0):
    """Flux img_ids [h·w, 3] of an h × w grid in raster order: (first, row0 + row, col0 + column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = row0 + torch.arange(h)[:, None]
    ids[..., 2] = col0 + torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def sd3_controlnet(seed: int = 0):
    """A tiny SD3ControlNetModel (JointTransformerBlocks) matching tiny.sd3's sizes."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    config = {k: v for k, v in SD3_TRANSFORMER.items() if k not in ("dual_attention_layers", "qk_norm")}
    return _unzeroed(SD3ControlNetModel(**dict(config, num_layers=2)).eval())


def flux_controlnet(seed: int = 0):
    """A tiny FluxControlNetModel (Flux double- and single-stream blocks) matching tiny.flux's sizes."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed)
    return _unzeroed(FluxControlNetModel(**FLUX_TRANSFORMER).eval())


def _unzeroed(net):
    """diffusers zero-inits a ControlNet's output and conditioning layers: make the residuals matter."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_", "pos_embed_input")):
                p.normal_(std=0.05)
    return net
