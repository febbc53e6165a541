"""The reference the benchmarks time tomesd against: tomesd 0.1.3's bipartite_soft_matching_random2d,
reimplemented from its description (written once here; bench_core.py and bench_kernels.py use it).

Its steps: split-gather of src and dst tokens, a dense [S × D] cosine score matrix, argsort of each
src's best score, scatter_reduce(mean) + cat to merge, zeros + three scatters to unmerge. Indices are
1-D: dst_idx [D] and src_idx [S] (token positions in [0, N)); `state` is (kept [B, S − r, 1],
merging [B, r, 1], their_dst [B, r, 1]): rows of src_idx left alone, rows that merge, and the dst
row (in [0, D)) each merges into.
"""
from __future__ import annotations

import torch


def partition(h: int, w: int, sx: int, sy: int):
    """(dst_idx [D], src_idx [S]) of an h × w grid, each sy × sx cell's first token a dst (use_rand
    off), in the order 0.1.3's argsort of the dst marks gives."""
    hsy, wsx = h // sy, w // sx
    marks = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    marks[..., 0] = -1  # the dst of each cell
    marks = marks.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    grid = torch.zeros(h, w, dtype=torch.int64)
    grid[: hsy * sy, : wsx * sx] = marks
    order = grid.reshape(-1).argsort()
    return order[: hsy * wsx], order[hsy * wsx:]


def match(metric, dst_idx, src_idx, r: int):
    """metric [B, N, C] → state: the r src with the highest best cosine score merge into their best dst."""
    B, _, C = metric.shape
    m = metric / metric.norm(dim=-1, keepdim=True)
    a = m.gather(1, src_idx.view(1, -1, 1).expand(B, -1, C))
    b = m.gather(1, dst_idx.view(1, -1, 1).expand(B, -1, C))
    scores = a @ b.transpose(-1, -2)  # [B, S, D]
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)[..., None]
    merging, kept = order[:, :r], order[:, r:]
    return kept, merging, best_dst[..., None].gather(1, merging)


def merge(x, dst_idx, src_idx, state):
    """x [B, N, C] → [B, N − r, C]: the kept src rows, then the dst rows averaged with their src."""
    kept, merging, their_dst = state
    B, _, C = x.shape
    src = x.gather(1, src_idx.view(1, -1, 1).expand(B, -1, C))
    dst = x.gather(1, dst_idx.view(1, -1, 1).expand(B, -1, C))
    unm = src.gather(1, kept.expand(-1, -1, C))
    moving = src.gather(1, merging.expand(-1, -1, C))
    dst = dst.scatter_reduce(1, their_dst.expand(-1, -1, C), moving, reduce="mean")
    return torch.cat([unm, dst], dim=1)


def unmerge(y, dst_idx, src_idx, state, n: int):
    """y [B, N − r, C] → [B, n, C]: each merged src gets its dst's row back."""
    kept, merging, their_dst = state
    B, _, C = y.shape
    n_kept = kept.shape[1]
    unm, dst = y[:, :n_kept], y[:, n_kept:]
    moved = dst.gather(1, their_dst.expand(-1, -1, C))
    out = torch.zeros(B, n, C, device=y.device, dtype=y.dtype)
    out.scatter_(1, dst_idx.view(1, -1, 1).expand(B, -1, C), dst)
    out.scatter_(1, src_idx[kept[..., 0]][..., None].expand(-1, -1, C), unm)
    out.scatter_(1, src_idx[merging[..., 0]][..., None].expand(-1, -1, C), moved)
    return out


def closures(metric, w: int, h: int, sx: int, sy: int, r: int):
    """0.1.3's interface: partition and match now, return (merge, unmerge) closures."""
    dst_idx, src_idx = partition(h, w, sx, sy)
    with torch.no_grad():
        state = match(metric, dst_idx, src_idx, min(r, len(src_idx)))
    return (lambda x: merge(x, dst_idx, src_idx, state),
            lambda y: unmerge(y, dst_idx, src_idx, state, metric.shape[1]))
