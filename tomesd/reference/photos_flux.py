"""photos-flux: the photos data set in a small Flux transformer, rectified flow, trained at 32 px.

A pixel-space diffusers `FluxTransformer2DModel`, driven as diffusers' FluxPipeline drives Flux.1:
- the image [B, 3, H, W] is packed 2×2 into tokens [B, (H/2)·(W/2), 12] (`pack`: FluxPipeline's
  _pack_latents on pixels instead of latents), with `img_ids` (0, row, column) per token, from which
  the transformer's rotary embeddings are computed (`image_ids`); at 32 / 64 / 128 px the image has
  256 / 1,024 / 4,096 tokens;
- the "text" is the class's 4 learned tokens (encoder_hidden_states, txt_ids all zero) and the
  pooled projection is their mean (pooled_projections);
- `TRANSFORMER_CONFIG`: 2 double-stream and 4 single-stream blocks, 3 heads of 32 channels (RoPE
  axes 8 + 12 + 12), no guidance embedding (Flux.1 dev's distilled guidance): classifier-free
  guidance with the unconditional class instead;
- rectified flow: x_t = (1 − t)·x0 + t·noise, the transformer predicts noise − x0 at t in [0, 1]
  (timestep = t, Flux-style: the model multiplies it by 1000); t logit-normal in training (SD 3);
  sampling is FlowMatchEulerDiscreteScheduler with Flux's resolution-dependent shift (mu from the
  token count: 0.5 at 256 tokens, 1.15 at 4,096, as Flux.1's scheduler config).

Data: the photos model's 32 px crops (tomesd.reference.photos.PhotoCrops), judged by the photos
classifier as it is (the same pixel scale). tomesd patches it through its Flux host
(tomesd/patch/hosts/mmdit.py): kv mode by default (the image part of every joint attention), or tokens
mode (image tokens merged at their anchors' rotary positions).

Trained by `python -m tomesd.reference.train --model photos-flux` (log in photos_flux_train.log).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from . import HERE, ClassEmbedding
from .photos import CLASSES, CROSS_DIM, TOKENS, PhotosPipeline

FLUX_DIR = os.path.join(HERE, "photos_flux")
FLUX_LOG = os.path.join(HERE, "photos_flux_train.log")
SIZE = 32
SIZES = (32, 64, 128)  # image tokens: 256 / 1,024 / 4,096
HEAD_DIM = 32

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=12,  # 3 channels × the 2×2 packing
    num_layers=2,  # double-stream blocks (Flux.1: 19)
    num_single_layers=4,  # single-stream blocks (Flux.1: 38)
    attention_head_dim=HEAD_DIM,
    num_attention_heads=3,
    joint_attention_dim=CROSS_DIM,
    pooled_projection_dim=CROSS_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),  # (class, row, column) parts of a head's rotary dims; they sum to HEAD_DIM
)
SCHEDULER_CONFIG = dict(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                        max_shift=1.15)


def pack(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] → tokens [B, (H/2)·(W/2), 4C]: each 2×2 patch one token, raster order (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """tokens [B, (H/2)·(W/2), 4C] → x [B, C, H, W], the inverse of pack (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """img_ids [(H/2)·(W/2), 3] of a packed H × W image: (0, row, column) per token, raster order."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def shift_mu(tokens: int, config) -> float:
    """Flux's resolution-dependent shift: mu linear in the token count through (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) of the scheduler's config."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (tokens - config.base_image_seq_len)


class PhotosFluxPipeline(PhotosPipeline):
    """Class-conditional RGB crops of photographs from a pixel-space Flux transformer (photo classes and
    outputs as PhotosPipeline's); H = W = 32 by default, any multiple of 2 (64, 128: larger canvases).
    The transformer sees a batch of 2·B (conditional and unconditional) when guidance_scale > 1."""

    model_cpu_offload_seq = "class_embedding->transformer"
    denoiser_name = "transformer"
    default_sample_size = SIZE  # tomesd.models.pipeline_size: a Flux transformer's config has no sample_size

    def __init__(self, transformer: FluxTransformer2DModel, class_embedding: ClassEmbedding,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        DiffusionPipeline.__init__(self)
        self.register_modules(transformer=transformer, class_embedding=class_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, int, Sequence[Union[str, int]], None] = None,
        class_labels: Optional[Sequence[int]] = None,
        num_inference_steps: int = 20,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        labels = self.labels(prompt, class_labels, num_images_per_prompt)
        height, width = height or SIZE, width or SIZE
        if height % 2 or width % 2:
            raise ValueError(f"height and width must be multiples of 2 (the image is packed 2×2), got {height}×{width}")
        device, dtype = self.transformer.device, self.transformer.dtype
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance_scale > 1.0
        cond = self.conditioning(labels, guided, device, dtype)
        tokens = pack(self.noise((len(labels), 3, height, width), generator, device, dtype))
        ids = image_ids(height, width, device, dtype)
        sigmas = [1.0 - i / num_inference_steps for i in range(num_inference_steps)]  # 1 … 1/steps, as FluxPipeline
        self.scheduler.set_timesteps(sigmas=sigmas, mu=shift_mu(tokens.shape[1], self.scheduler.config), device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([tokens, tokens]) if guided else tokens
            v = self.predict(inp, (t / 1000).expand(inp.shape[0]).to(dtype), cond, ids)
            if guided:
                v_c, v_u = v.chunk(2)
                v = v_u + guidance_scale * (v_c - v_u)
            tokens = self.scheduler.step(v, t, tokens).prev_sample
        return self.output(unpack(tokens, height, width), output_type, return_dict)

    def predict(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity (noise − x0) for packed tokens [B, N, 12] at t [B] in [0, 1]; cond
        [B, tokens, dim] (its mean is the pooled projection); ids: img_ids [N, 3]."""
        txt_ids = torch.zeros(cond.shape[1], 3, device=cond.device, dtype=ids.dtype)
        return self.transformer(hidden_states=tokens, encoder_hidden_states=cond, pooled_projections=cond.mean(1),
                                timestep=t, img_ids=ids, txt_ids=txt_ids).sample

    def training_loss(self, x0: torch.Tensor, class_ids: torch.Tensor, g: torch.Generator, *extra) -> torch.Tensor:
        """Rectified-flow MSE on x0 [B, 3, H, W] in [-1, 1]: t = sigmoid(N(0, 1)) (logit-normal), then
        the noise, drawn from g; the target is noise − x0, packed as the prediction."""
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
        noise = torch.randn(x0.shape, generator=g)
        s = t.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        ids = image_ids(x0.shape[2], x0.shape[3])
        return F.mse_loss(self.predict(pack(xt), t, self.class_embedding(class_ids), ids), pack(noise - x0))


def new_pipeline(seed: int = 0) -> PhotosFluxPipeline:
    """An untrained photos-flux pipeline (what train.py starts from)."""
    torch.manual_seed(seed)
    embedding = ClassEmbedding(num_classes=len(CLASSES) + 1, tokens=TOKENS, dim=CROSS_DIM)
    return PhotosFluxPipeline(FluxTransformer2DModel(**TRANSFORMER_CONFIG), embedding,
                              FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))


def load_pipeline(path: Optional[str] = None, device: Union[str, torch.device] = "cpu", dtype=torch.float32) -> PhotosFluxPipeline:
    """The shipped photos-flux pipeline (or one saved at `path`), in eval mode, without gradients."""
    from . import load_pipeline as load_reference

    return load_reference(path or FLUX_DIR, device=device, dtype=dtype, pipeline_class=PhotosFluxPipeline)
