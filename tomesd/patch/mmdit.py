"""MMDiT hosts (diffusers): Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`, `JointTransformerBlock`)
and Flux (`FluxTransformer2DModel`: double-stream `FluxTransformerBlock`s, then single-stream
`FluxSingleTransformerBlock`s), and their pipelines' `.transformer`.

Image and text tokens attend jointly, every block at the full token grid (one level, /1). Only image
tokens are merged; the metric is a block's image-token input. In a joint attention the processor
concatenates image and text queries, keys and values and calls F.scaled_dot_product_attention once:
- tokens mode merges the image tokens before the attention (and SD 3.5's image-only `attn2`, and the
  feed-forward with merge_mlp) and unmerges the image output after; text tokens attend to the merged
  image tokens and are never merged themselves;
- kv mode (and prop_attn) act inside that SDPA call on the image part of the keys and values, after
  every projection, q/k norm and (Flux) rotary embedding, so queries keep their positions.
Flux applies rotary embeddings per token: merged tokens fed to its attention would carry no valid
position, so tokens mode is refused there: mode="kv" is the supported mode and Flux's default (its
feed-forwards may still merge as tokens with merge_mlp). Single-stream blocks take the image tokens apart from the text on diffusers
versions whose `FluxSingleTransformerBlock.forward` has `encoder_hidden_states`; on older ones their
input is the concatenated sequence, which is no token grid, so they are not merged (logged).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from .diffusers import _vae_scale_factor, denoiser, sublayer_refusal
from .hooks import Host, Sublayer, _get_arg

SD3_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("attn2", "self"), Sublayer("ff", "mlp"))
FLUX_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("ff", "mlp"))
FLUX_TOKENS_REFUSAL = ("Flux applies rotary position embeddings per token, and merged tokens have no single "
                       "position")


def _flux_latent_size(args: tuple, kwargs: dict) -> Optional[Tuple[int, int]]:
    """(H, W) of the latent behind Flux's packed 2×2 tokens, from img_ids [N, 3] = (0, row, col)."""
    ids, _ = _get_arg(args, kwargs, ("img_ids",), None)
    if not isinstance(ids, Tensor) or ids.shape[-1] != 3:
        return None
    ids = ids.reshape(-1, 3)
    rows, cols = ids[:, 1].max(), ids[:, 2].max()
    return 2 * (int(rows) + 1), 2 * (int(cols) + 1)


def find_host(model, root: Optional[nn.Module] = None) -> Optional[Host]:
    """Host for an SD 3 / 3.5 or Flux transformer (or pipeline), or None if `model` is neither."""
    root = denoiser(model) if root is None else root
    if root is None:
        return None
    name = type(root).__name__
    if name == "SD3Transformer2DModel":
        from diffusers.models.attention import JointTransformerBlock

        blocks = [m for m in root.modules() if isinstance(m, JointTransformerBlock)]
        return Host(name="sd3", root=root, blocks=blocks, top_level=1, vae_scale_factor=_vae_scale_factor(model),
                    patch_size=int(root.config.patch_size), sample_names=("hidden_states",),
                    sublayers=SD3_SUBLAYERS, sublayer_refusal=sublayer_refusal, joint="first")
    if name == "FluxTransformer2DModel":
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        blocks = [m for m in root.modules() if isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock))]
        return Host(name="flux", root=root, blocks=blocks, top_level=1, vae_scale_factor=_vae_scale_factor(model),
                    patch_size=2, sample_names=("hidden_states",), sublayers=FLUX_SUBLAYERS,
                    sublayer_refusal=sublayer_refusal, joint="last", tokens_refusal=FLUX_TOKENS_REFUSAL,
                    locate=_flux_latent_size, default_mode="kv")
    return None
