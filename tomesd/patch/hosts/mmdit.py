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

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..args import arg_position, get_arg
from ..compiled import exporting, raise_error
from .base import Sublayer
from .diffusers import DiffusersHost, denoiser, vae_scale_factor
from .sdpa import JointAttention

SD3_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("attn2", "self"), Sublayer("ff", "mlp"))
FLUX_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("ff", "mlp"))
MAX_REFERENCES = 8  # reference image grids after the output image's in Flux img_ids (Kontext: 1)
FLUX_EXPORT_ERROR = ("tomesd: Flux reads its token layout from the values of img_ids, which torch.export traces "
                     "without showing them; export with tomesd.export.export(model, args, kwargs), or inside "
                     "`with tomesd.export.exporting(model, args, kwargs):`, which read it from the example inputs "
                     "(the exported program keeps that layout, as it keeps their shapes)")
FLUX_TOKENS_REFUSAL = ("Flux applies rotary position embeddings per token, and merged tokens have no single "
                       "position; use mode='kv' (or merge_attn=False)")


@dataclass
class FluxHost(DiffusersHost):
    """Flux: packed 2×2 latent tokens whose layout comes from img_ids (its root's argument `img_ids`, at
    position ids_pos when passed positionally)."""

    ids_pos: Optional[int] = None
    last: "LastIds" = field(default_factory=lambda: LastIds(), repr=False, compare=False)
    reads_inputs = True  # its layout is read from img_ids' values (a class attribute, not a field)

    def locate(self, args, kwargs):
        """(H, W, tail): the latent size behind the output image's packed 2×2 tokens and the number of
        tokens after them (reference images, passed through unmerged), read from img_ids; a str saying why
        img_ids are no layout tomesd recognizes; None without img_ids. The ids are read once per tensor (a
        pipeline passes the same img_ids at every step): one host sync, outside compiled code."""
        ids, _ = get_arg(args, kwargs, ("img_ids",), self.ids_pos)
        if not isinstance(ids, Tensor):
            return None
        layout = self._pinned(ids) if exporting() else _cached_layout(self, ids)
        if isinstance(layout, str):
            return layout
        h, w, tail = layout
        return 2 * h, 2 * w, tail

    @contextlib.contextmanager
    def export_inputs(self, args, kwargs):
        """Traced calls inside take the layout of these example inputs' img_ids (read here, on the host)."""
        ids, _ = get_arg(args, kwargs, ("img_ids",), self.ids_pos)
        pinned = (tuple(ids.shape), ids_layout(ids)) if isinstance(ids, Tensor) else None
        previous, self.last.pinned = self.last.pinned, pinned
        try:
            yield
        finally:
            self.last.pinned = previous

    def _pinned(self, ids: Tensor):
        pinned = self.last.pinned
        if pinned is None or pinned[0] != tuple(ids.shape):
            raise_error(RuntimeError, FLUX_EXPORT_ERROR)
        return pinned[1]


class LastIds:
    """The last img_ids tensor read (weakly) and its layout; a copy of the host starts empty. pinned:
    (shape, layout) of the example img_ids of an export in progress (FluxHost.export_inputs)."""

    def __init__(self):
        self.entry: Optional[tuple] = None
        self.pinned: Optional[tuple] = None

    def __reduce__(self):
        return (LastIds, ())


@torch.compiler.disable
def _cached_layout(host: FluxHost, ids: Tensor):
    entry = host.last.entry
    memory = (ids._version, tuple(ids.shape), ids.device)
    if entry is not None and entry[0]() is ids and entry[1] == memory:
        return entry[2]
    layout = ids_layout(ids)
    host.last.entry = (weakref.ref(ids), memory, layout)
    return layout


def _grid(ids: Tensor, start: int) -> Tuple[int, int]:
    """(h, w) of the raster grid that starts at token `start` of ids [N, 3] (float64, on the CPU): one
    first coordinate, rows r0, r0 + 1, ... and columns c0, c0 + 1, ..., each row whole."""
    rest = ids[start:]
    c, r0, c0 = rest[0].tolist()
    n = torch.arange(rest.shape[0], dtype=ids.dtype)
    run = (rest[:, 0] == c) & (rest[:, 1] == r0) & (rest[:, 2] == c0 + n)
    w = int(run.int().cumprod(0).sum())
    h_max = rest.shape[0] // w
    k = n[: h_max * w]
    whole = ((rest[: h_max * w, 0] == c) & (rest[: h_max * w, 1] == r0 + k // w) & (rest[: h_max * w, 2] == c0 + k % w))
    return int(whole.view(h_max, w).all(1).int().cumprod(0).sum()), w


def ids_layout(ids: Tensor):
    """(h, w, tail) of Flux's img_ids [N, 3] (or [1, N, 3]), one (c, row, col) per image token, or a str
    saying why it is no such layout.

    The layouts diffusers' Flux pipelines produce: the output image's h × w grid in raster order (one c,
    rows and columns counting up from the first token's), then `tail` tokens of reference images, each
    a raster grid of its own (FluxKontextPipeline: c = 1, its own size). Fill, Control and Redux pass
    the plain grid (tail 0). Only the output image's grid is merged; anything else is refused."""
    if ids.ndim == 3:  # deprecated batched ids: diffusers reads the first
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[1] != 3 or ids.shape[0] == 0:
        return f"img_ids of shape {tuple(ids.shape)} are not [N, 3] (c, row, column) ids"
    ids = ids.detach().to("cpu", torch.float64)
    if not bool((ids == ids.round()).all()):
        return "img_ids hold positions that are not whole numbers"
    if ids[0, 1:].tolist() != [0.0, 0.0]:
        return "img_ids do not start at row 0, column 0 (the output image's first token)"
    h, w = _grid(ids, 0)
    start, pieces = h * w, 0
    while start < ids.shape[0] and pieces <= MAX_REFERENCES:
        gh, gw = _grid(ids, start)
        start, pieces = start + gh * gw, pieces + 1
    if pieces > MAX_REFERENCES:
        return (f"the img_ids after the output image's {h}×{w} grid are no reference image grids in raster "
                f"order (more than {MAX_REFERENCES} pieces)")
    return h, w, ids.shape[0] - h * w


def find_host(model, root: Optional[nn.Module] = None) -> Optional[DiffusersHost]:
    """Host for an SD 3 / 3.5 or Flux transformer or ControlNet (or a pipeline's transformer), or None if
    `model` is none of them."""
    root = denoiser(model) if root is None else root
    if root is None:
        return None
    name = type(root).__name__
    if name in ("SD3Transformer2DModel", "SD3ControlNetModel"):
        from diffusers.models.attention import JointTransformerBlock

        blocks = [m for m in root.modules() if isinstance(m, JointTransformerBlock)]
        if not blocks and name == "SD3ControlNetModel":
            raise ValueError(f"tomesd: this {name} (SD 3.5 Large ControlNet) is built of SD3SingleTransformerBlocks, "
                             "which take the image tokens the transformer embedded rather than a latent and have no "
                             "joint attention; tomesd does not merge there (patch the transformer only)")
        return DiffusersHost(name="sd3", root=root, blocks=blocks, top_level=1, attention=JointAttention(True),
                             vae_scale_factor=vae_scale_factor(model), patch_size=int(root.config.patch_size),
                             sample_names=("hidden_states",), sublayers=SD3_SUBLAYERS)
    if name in ("FluxTransformer2DModel", "FluxControlNetModel"):
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        blocks = [m for m in root.modules() if isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock))]
        return FluxHost(name="flux", root=root, blocks=blocks, top_level=1, attention=JointAttention(False),
                        vae_scale_factor=vae_scale_factor(model), patch_size=2, sample_names=("hidden_states",),
                        sublayers=FLUX_SUBLAYERS, mode_refusals={"tokens": FLUX_TOKENS_REFUSAL}, default_mode="kv",
                        timestep_scale=1000.0, ids_pos=arg_position(root, ("img_ids",), None))
    return None
