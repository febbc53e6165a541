"""Level geometry: which UNet level a block's token count belongs to, and a host's top level."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from torch import nn


def level_of(grid_h: int, grid_w: int, n: int) -> Optional[Tuple[int, int, int]]:
    """(downsample, h, w) of the level with n tokens, following the chain of stride-2 downsamplers
    from the grid_h × grid_w level-1 grid (each halves a side, rounding up); None if no level has n."""
    h, w, d = grid_h, grid_w, 1
    while h * w > n and (h > 1 or w > 1):
        h, w, d = -(-h // 2), -(-w // 2), d * 2
    return (d, h, w) if h * w == n else None


def top_level(stages: Sequence[nn.Module], blocks: Sequence[nn.Module], downsamples: Callable[[nn.Module], bool]) -> int:
    """Downsample factor of the first stage (forward order) holding a transformer block.

    stages: the down path (e.g. UNet2DConditionModel.down_blocks); downsamples(stage) says whether a
    stage halves the resolution after it. No stages (a Transformer2DModel, a DiT): 1.
    """
    ids = {id(b) for b in blocks}
    factor = 1
    for stage in stages:
        if any(id(m) in ids for m in stage.modules()):
            return factor
        if downsamples(stage):
            factor *= 2
    return factor
