"""Seeing what merges: color each latent token by the destination it merged into.

    tomesd.apply_patch(pipe, ratio=0.5, seed=0)
    with MergeRecorder(pipe, steps=[10]) as rec:
        image = pipe(prompt).images[0]
    overlay(image, rec.get(step=10)).save("merges.png")

A MergeRecorder adds a pre-hook on the denoiser (counting its calls: one per denoising step) and an
observer to the patched model (`patched_state(model).observers`, told of every block's MergePlan and
the request it was built for); at the chosen steps it copies the plan's slot map of the image grid
[B, h·w] to the CPU. It records on every host tomesd patches (UNets, SD 3, Flux) and whichever
sub-layers merge (merge_attn=False included). Tokens with the same slot form one
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


class NoMergeRecorded(KeyError):
    """MergeRecorder.get found no snapshot matching its filters (a KeyError, printed as plain text)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
        self._state = None
        self._handle = None

    def __enter__(self) -> "MergeRecorder":
        state = patched_state(self.model)
        if state is None:
            raise ValueError("MergeRecorder: the model is not patched; call tomesd.apply_patch first")
        self._state = state
        self._handle = state.host.root.register_forward_pre_hook(self._on_call)
        state.observers.append(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._state is not None and self._observe in self._state.observers:
            self._state.observers.remove(self._observe)
        self._state = None

    def _on_call(self, module, args) -> None:
        self._step = self.calls
        self.calls += 1

    def _observe(self, index: int, plan, request) -> None:
        """Observer of the patched model: block `index` merges with `plan` built for `request`."""
        if self._step < 0 or (self.steps is not None and self._step not in self.steps):
            return
        n = request.h * request.w  # the image grid; tokens before / after it (Flux references) are not drawn
        slot = plan.slot[:, request.head: request.head + n].detach().cpu()
        self.snapshots.append(MergeSnapshot(self._step, index, (request.h, request.w), request.downsample, slot))

    def get(self, step: Optional[int] = None, block: Optional[int] = None, level: Optional[int] = None) -> MergeSnapshot:
        """The snapshot of `step` (default: the first recorded) and `block` (default: the first
        merged block of that step, at downsample `level` when given). Raises NoMergeRecorded (a
        KeyError) naming what was recorded when nothing matches."""
        found = [s for s in self.snapshots if (step is None or s.step == step) and (block is None or s.block == block)
                 and (level is None or s.downsample == level)]
        if found:
            return found[0]
        wanted = f"step={step}, block={block}, level={level}"
        if not self.snapshots:
            which = "all steps" if self.steps is None else f"steps {sorted(self.steps)}"
            raise NoMergeRecorded(f"MergeRecorder.get({wanted}): nothing was recorded — the model was called "
                                  f"{self.calls} time(s) inside the recorder and merged no block at {which}")
        have = sorted({(s.step, s.block, s.downsample) for s in self.snapshots})
        raise NoMergeRecorded(f"MergeRecorder.get({wanted}): no merge recorded there; "
                              f"recorded (step, block, level): {have}")


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
