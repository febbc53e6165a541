"""Seeing what merges: color each latent token by the destination it merged into.

    tomesd.apply_patch(pipe, ratio=0.5, seed=0)
    with MergeRecorder(pipe, steps=[10]) as rec:
        image = pipe(prompt).images[0]
    overlay(image, rec.get(step=10)).save("merges.png")

A MergeRecorder adds, after tomesd's own hooks, a pre-hook on the denoiser (counting its calls: one
per denoising step) and one on each patched block's attn1, where the block's MergePlan is built; at
the chosen steps it copies the plan's slot map [B, N] to the CPU. Tokens with the same slot form one
group: a dst and the src tokens averaged into it. `token_colors` gives each group of two or more
tokens its own color (distinct for every group of the map) and every unmerged token one grey;
`overlay` upsamples that h × w map to the image and blends it in.

Rows of the batch: a pipeline with classifier-free guidance runs [unconditional..., conditional...],
so row -1 (the default) is the conditional pass of the last image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .patch import patched_state
from .patch import current_plan, level_of

GREY = (128, 128, 128)
_M24 = (1 << 24) - 1


@dataclass(frozen=True)
class MergeSnapshot:
    """One block's merge at one denoiser call.

    step: index of the denoiser call (0 = first denoising step); block: tomesd's block index;
    grid: (h, w) tokens of the block's level; downsample: the level (1 = latent resolution);
    slot: [B, N] int64 on the CPU, N = h·w, the output row each token went to.
    """

    step: int
    block: int
    grid: Tuple[int, int]
    downsample: int
    slot: Tensor

    def groups(self, row: int = -1) -> Tuple[Tensor, Tensor]:
        """(group of each token [N] in [0, M), size of each group [M]) for batch row `row`."""
        slot = self.slot[row]
        return slot, torch.bincount(slot, minlength=int(slot.max()) + 1)

    def merged_tokens(self, row: int = -1) -> int:
        """How many tokens of `row` were averaged into another token (N − M)."""
        slot, sizes = self.groups(row)
        return int(slot.numel() - sizes.numel())


class MergeRecorder:
    """Context manager recording MergeSnapshots of a patched model (pipeline or denoiser).

    steps: the denoiser calls to record (ints, counted from 0 on entering), or None for all.
    After the block, `snapshots` holds them in call order; `get` picks one.
    """

    def __init__(self, model, steps: Optional[Union[int, Iterable[int]]] = None):
        self.model = model
        self.steps = None if steps is None else ({steps} if isinstance(steps, int) else set(steps))
        self.snapshots: List[MergeSnapshot] = []
        self.calls = 0
        self._step = -1
        self._latent: Optional[Tuple[int, int]] = None
        self._handles = []

    def __enter__(self) -> "MergeRecorder":
        state = patched_state(self.model)
        if state is None:
            raise ValueError("MergeRecorder: the model is not patched; call tomesd.apply_patch first")
        host = state.host
        self._handles.append(host.root.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for index, module in enumerate(host.blocks):
            attn = getattr(module, host.sublayers[0].name, None)
            if attn is not None:
                self._handles.append(attn.register_forward_pre_hook(self._block_hook(state, index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else next((kwargs[k] for k in ("sample", "x", "hidden_states") if k in kwargs), None)
        self._latent = tuple(sample.shape[-2:]) if isinstance(sample, Tensor) and sample.ndim >= 4 else None
        self._step = self.calls
        self.calls += 1

    def _block_hook(self, state, index: int):
        def hook(module, args) -> None:
            plan = current_plan(state, index)
            if plan is None or self._latent is None or (self.steps is not None and self._step not in self.steps):
                return
            p = state.host.patch_size
            level = level_of(self._latent[0] // p, self._latent[1] // p, plan.slot.shape[1])
            if level is None:
                return  # a token layout this recorder cannot place on the image
            downsample, *grid = level
            self.snapshots.append(MergeSnapshot(self._step, index, tuple(grid), downsample, plan.slot.detach().cpu()))

        return hook

    def get(self, step: Optional[int] = None, block: Optional[int] = None, level: Optional[int] = None) -> MergeSnapshot:
        """The snapshot of `step` (default: the first recorded) and `block` (default: the first
        merged block of that step, at downsample `level` when given)."""
        found = [s for s in self.snapshots if (step is None or s.step == step) and (block is None or s.block == block)
                 and (level is None or s.downsample == level)]
        if not found:
            have = sorted({(s.step, s.block, s.downsample) for s in self.snapshots})
            raise KeyError(f"no merge recorded for step={step}, block={block}, level={level}; "
                           f"recorded (step, block, level): {have}")
        return found[0]


def _scramble24(x: Tensor) -> Tensor:
    """A bijection of [0, 2**24): distinct inputs give distinct 24-bit colors."""
    x = (x * 0x9E3779) & _M24  # odd multiplier: invertible mod 2**24
    x = x ^ (x >> 11)
    x = (x * 0x5BD1E5) & _M24
    return x ^ (x >> 13)


def token_colors(slot: Tensor) -> np.ndarray:
    """RGB uint8 [N, 3] for one row's slot map [N]: each group of ≥ 2 tokens its own color, unmerged
    tokens GREY. Colors of different groups differ (and none is GREY)."""
    slot = slot.to(torch.int64).cpu()
    sizes = torch.bincount(slot)
    multi = (sizes >= 2).nonzero().flatten()  # slots holding a merge, in slot order
    grey = (GREY[0] << 16) | (GREY[1] << 8) | GREY[2]
    codes = _scramble24(torch.arange(1, multi.numel() + 2, dtype=torch.int64))
    codes = codes[codes != grey][: multi.numel()]
    per_slot = torch.full((sizes.numel(),), grey, dtype=torch.int64)
    per_slot[multi] = codes
    rgb = per_slot[slot]
    return torch.stack([(rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255], dim=-1).to(torch.uint8).numpy()


def color_map(snapshot: MergeSnapshot, row: int = -1) -> np.ndarray:
    """RGB uint8 [h, w, 3]: the token grid of `snapshot` colored by destination (token_colors)."""
    h, w = snapshot.grid
    return token_colors(snapshot.slot[row]).reshape(h, w, 3)


def overlay(image, snapshot: MergeSnapshot, row: int = -1, alpha: float = 0.55):
    """PIL image: `image` (PIL) blended with the color map upsampled to its size (nearest, so each
    token is a block of pixels). alpha=1 gives the color map alone."""
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = Image.fromarray(color_map(snapshot, row)).resize(image.size, Image.NEAREST)
    return Image.blend(image.convert("RGB"), colors, alpha)
