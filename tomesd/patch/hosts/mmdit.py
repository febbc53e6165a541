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
Flux applies rotary embeddings per token. kv mode (its default) merges keys and values after them. In
tokens mode a merged token takes its anchor's position (rotary.py): double-stream blocks merge their
joint attention's image input (and the feed-forward with merge_mlp) like SD 3; a single-stream block
runs its attention and MLP side by side on one text + image sequence, so with merge_attn the whole block
merges (Sublayer kind "block"): image tokens merged before it, each rebuilt after it as its own input
plus its row's change. Single-stream blocks take the image tokens apart from the text on diffusers
versions whose `FluxSingleTransformerBlock.forward` has `encoder_hidden_states`; on older ones their
input is the concatenated sequence, which is no token grid, so they are not merged (logged).
"""
from __future__ import annotations

import inspect
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
from .rotary import ROTARY_NAMES, RotaryJointAttention
from .sdpa import JointAttention

SD3_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("attn2", "self"), Sublayer("ff", "mlp"))
FLUX_SUBLAYERS = (Sublayer("attn", "self"), Sublayer("ff", "mlp"))
FLUX_WHOLE_BLOCK = Sublayer("block", "block", attention="attn")  # single-stream blocks in tokens mode
MAX_REFERENCES = 8  # reference image grids after the output image's in Flux img_ids (Kontext: 1)
FLUX_EXPORT_ERROR = ("tomesd: Flux reads its token layout from the values of img_ids, which torch.export traces "
                     "without showing them; export with tomesd.export.export(model, args, kwargs), or inside "
                     "`with tomesd.export.exporting(model, args, kwargs):`, which read it from the example inputs "
                     "(the exported program keeps that layout, as it keeps their shapes)")


@dataclass
class FluxHost(DiffusersHost):
    """Flux: packed 2×2 latent tokens whose layout comes from img_ids (its root's argument `img_ids`, at
    position ids_pos when passed positionally)."""

    ids_pos: Optional[int] = None
    last: "LastIds" = field(default_factory=lambda: LastIds(), repr=False, compare=False)
    whole_blocks: Tuple[type, ...] = ()  # block classes that merge whole in tokens mode (single-stream)
    reads_inputs = True  # its layout is read from img_ids' values (a class attribute, not a field)

    def block_sublayers(self, block, config, merges_inputs):
        if merges_inputs and isinstance(block, self.whole_blocks):
            return [FLUX_WHOLE_BLOCK] if config.merge_attn else []
        return super().block_sublayers(block, config, merges_inputs)

    def locate(self, args, kwargs):
        """(H, W, head, tail): the latent size behind the output image's packed 2×2 tokens and the numbers
        of tokens before and after them (reference images, passed through unmerged), read from img_ids; a
        str saying why img_ids are no layout tomesd recognizes; None without img_ids. The ids are read once
        per tensor (a pipeline passes the same img_ids at every step): one host sync, outside compiled code."""
        ids, _ = get_arg(args, kwargs, ("img_ids",), self.ids_pos)
        if not isinstance(ids, Tensor):
            return None
        layout = self._pinned(ids) if exporting() else _cached_layout(self, ids)
        if isinstance(layout, str):
            return layout
        h, w, head, tail = layout
        return 2 * h, 2 * w, head, tail

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


def _pieces(ids: Tensor):
    """[(start, h, w)] of ids split into raster grids (at most MAX_REFERENCES + 1), or None if there are more."""
    pieces, start = [], 0
    while start < ids.shape[0]:
        if len(pieces) > MAX_REFERENCES:
            return None
        h, w = _grid(ids, start)
        pieces.append((start, h, w))
        start += h * w
    return pieces


def ids_layout(ids: Tensor):
    """(h, w, head, tail) of Flux's img_ids [N, 3] (or [1, N, 3]), one (c, row, col) per image token, or a
    str saying why it is no such layout.

    The layouts diffusers' Flux pipelines produce: the output image's h × w grid in raster order (c = 0,
    rows and columns counting up from 0), then `tail` tokens of reference images, each a raster grid of
    its own (FluxKontextPipeline: c = 1, its own size). Fill, Control and Redux pass the plain grid. A
    layout with reference grids first (c ≠ 0) and the output grid after them (`head` tokens before it) is
    read alike: the output grid is the first grid with c = 0 starting at row 0, column 0 (else the first
    grid, when it starts there). Only the output image's grid is merged; anything else — ids in
    column-major order included — is refused."""
    if ids.ndim == 3:  # deprecated batched ids: diffusers reads the first
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[1] != 3 or ids.shape[0] == 0:
        return f"img_ids of shape {tuple(ids.shape)} are not [N, 3] (c, row, column) ids"
    ids = ids.detach().to("cpu", torch.float64)
    if not bool((ids == ids.round()).all()):
        return "img_ids hold positions that are not whole numbers"
    pieces = _pieces(ids)
    if pieces is None:
        return (f"img_ids are no output image grid and at most {MAX_REFERENCES} reference image grids, each in "
                "raster order")
    origins = [ids[start].tolist() for start, _, _ in pieces]
    output = next((i for i, o in enumerate(origins) if o == [0.0, 0.0, 0.0]), None)
    if output is None and origins[0][1:] == [0.0, 0.0]:
        output = 0
    if output is None:
        return "img_ids hold no image grid starting at row 0, column 0 (the output image's first token)"
    start, h, w = pieces[output]
    if w == 1 and h > 1 and _grid(ids[:, [0, 2, 1]], start)[0] > 1:
        return ("img_ids are in column-major order (the output image's tokens column by column); tomesd reads "
                "the raster order diffusers' Flux pipelines use (row by row)")
    return h, w, start, ids.shape[0] - start - h * w


def _rotary_positions(blocks, single_type: type) -> dict:
    """Sublayer kind → position of `image_rotary_emb` in the forward of that kind's module (Flux's
    attention for "self", a single-stream block for "block"; None: keyword only)."""
    single = [b for b in blocks if isinstance(b, single_type)]
    attn = next((b.attn for b in blocks if isinstance(getattr(b, "attn", None), nn.Module)), None)
    return {"self": arg_position(attn, ROTARY_NAMES, None) if attn is not None else None,
            "block": arg_position(single[0], ROTARY_NAMES, None) if single else None}


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
        split = "encoder_hidden_states" in inspect.signature(FluxSingleTransformerBlock.forward).parameters
        attention = RotaryJointAttention(False, inner=FLUX_WHOLE_BLOCK.attention,
                                         rotary_at=_rotary_positions(blocks, FluxSingleTransformerBlock))
        return FluxHost(name="flux", root=root, blocks=blocks, top_level=1, attention=attention,
                        vae_scale_factor=vae_scale_factor(model), patch_size=2, sample_names=("hidden_states",),
                        sublayers=FLUX_SUBLAYERS, default_mode="kv", timestep_scale=1000.0,
                        ids_pos=arg_position(root, ("img_ids",), None),
                        whole_blocks=(FluxSingleTransformerBlock,) if split else ())
    return None
