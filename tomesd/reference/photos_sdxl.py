"""photos-sdxl: the photos data set in a UNet with SDXL's layout, trained at 64 px.

SDXL's UNet has no attention at its full-resolution level, two transformer layers per block at /2
and ten at /4 (mid block included), linear projections in and out of its transformers, and
"text_time" added conditioning (a pooled text embedding and six micro-conditioning ids). This is
that layout at 1/20 of SDXL's width, in pixel space:

- `UNET_CONFIG`: channels (16, 32, 64); level /1 a DownBlock2D / UpBlock2D (convolutions only),
  /2 and /4 CrossAttn blocks with 2 and 4 transformer layers each (the mid block 4), 32 channels per
  head, `use_linear_projection=True`, `addition_embed_type="text_time"`. At 64 px the /2 level holds
  32×32 = 1,024 tokens and /4 256; at 128 and 256 px, 4,096 and 16,384 at /2 (SDXL at 1024 px:
  4,096 at /2).
- Data: the photos model's crops (tomesd.reference.photos.PhotoCrops: the same photographs, held-out
  squares and crop sides of 40-96 px) resized to 64 px instead of 32, so a 64 px sample covers the
  field of a 32 px photos sample at twice its pixels.
- Added conditioning (`PhotosSDXLPipeline.predict`): text_embeds = the mean of the class's tokens
  (the pooled "text"), time_ids = (original side, original side, 0, 0, 64, 64) as SDXL's (original
  size, crop top-left, target size): in training the crop's side in the photograph's pixels (40-96;
  the crop is resized whole, so its top-left is 0, 0), in sampling `ORIGINAL_SIDE` (one photograph
  pixel per output pixel) at every canvas size, so a larger canvas shows more of the texture at the
  same scale.
- Judged by the photos classifier at half scale (`HalfScale`): a 64 px sample read at 32 px is at
  the pixel scale that classifier was trained at (its 32 px crops of the same 40-96 px squares); on
  600 held-out crops it reads 94.7% at half scale against 93.7% at 64 px directly.

Trained by `python -m tomesd.reference.train --model photos-sdxl` (log in photos_sdxl_train.log).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import HERE
from .photos import CROSS_DIM, PhotosPipeline, load_classifier as load_photos_classifier, new_pipeline as new_photos_pipeline

SDXL_DIR = os.path.join(HERE, "photos_sdxl")
SDXL_LOG = os.path.join(HERE, "photos_sdxl_train.log")
SIZE = 64
SIZES = (64, 128, 256)  # /2-level tokens: 1,024 / 4,096 / 16,384
ORIGINAL_SIDE = 64  # sampling's "original size": a 64 px crop of the photograph drawn at 64 px
TIME_EMBED_DIM = 16  # Fourier features per time id (SDXL: 256)

UNET_CONFIG = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 4),  # the first level has none (DownBlock2D); the mid block takes the last
    attention_head_dim=(1, 1, 2),  # diffusers' legacy name: heads per level → 32 channels per head
    use_linear_projection=True,
    cross_attention_dim=CROSS_DIM,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=CROSS_DIM + 6 * TIME_EMBED_DIM,
)


class HalfScale(nn.Module):
    """A classifier read at half scale: x [B, 3, H, W] → classifier(x resized to H/2 × W/2, antialiased)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
        return self.classifier(half)


class PhotosSDXLPipeline(PhotosPipeline):
    """photos-sdxl: PhotosPipeline's sampler (DDIM, classifier-free guidance) on the SDXL-layout UNet,
    with its added conditioning; H = W = 64 by default, any multiple of 4 (128, 256: larger canvases)."""

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, sides: Optional[torch.Tensor] = None):
        """The UNet's noise prediction for x [B, 3, H, W]; cond [B, tokens, dim]; sides [B]: the original
        side of each image (training crops; None: ORIGINAL_SIDE)."""
        b = x.shape[0]
        sides = torch.full((b,), float(ORIGINAL_SIDE)) if sides is None else sides.float()
        zeros = torch.zeros(b)
        time_ids = torch.stack([sides, sides, zeros, zeros, zeros + SIZE, zeros + SIZE], 1).to(x.device, x.dtype)
        added = dict(text_embeds=cond.mean(1), time_ids=time_ids)
        return self.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample

    def reference_classifier(self, device: Union[str, torch.device] = "cpu") -> nn.Module:
        return load_classifier(device)


def new_pipeline(seed: int = 0) -> PhotosSDXLPipeline:
    """An untrained photos-sdxl pipeline (what train.py starts from)."""
    return new_photos_pipeline(seed, PhotosSDXLPipeline, UNET_CONFIG)


def load_pipeline(path: Optional[str] = None, device: Union[str, torch.device] = "cpu", dtype=torch.float32) -> PhotosSDXLPipeline:
    """The shipped photos-sdxl pipeline (or one saved at `path`), in eval mode, without gradients."""
    from . import load_pipeline as load_reference

    return load_reference(path or SDXL_DIR, device=device, dtype=dtype, pipeline_class=PhotosSDXLPipeline)


def load_classifier(device: Union[str, torch.device] = "cpu") -> HalfScale:
    """The classifier photos-sdxl samples are judged with: the photos classifier at half scale."""
    return HalfScale(load_photos_classifier(device=device)).eval()
