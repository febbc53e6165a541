"""Exact ties in the PyTorch path's matching (tomesd.matching): what makes equal tokens tie exactly.

A matmul rounds identical columns (and rows) differently depending on where they sit, so scores of
bitwise-identical tokens can differ in their last bit, and the rules "the lowest dst position among equal
scores" and "the lower src position at the r-th place" would follow that rounding. The matching therefore
groups bitwise-identical tokens (`token_classes`) and lets a group's lowest position stand for it
(`min_alike`, `lowest_alike`), gives every identical (src, dst) pair one score and a src identical to its
dst exactly 1 (`settle`), and selects the r best src by unique integer keys with the kernels' order
(`select_keys`, csrc/rules.h select_key). Every step is a fixed-shape tensor op: no host sync, so it
traces under torch.compile(fullgraph=True) and records into a CUDA graph.

Layouts: tokens m [B, N, C] fp32; keys and classes [B, N] int64 (or [..., L] along the last dim).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Element budget of the [B, rows, C] temporaries of token_classes: 2**22 elements.
CLASS_CHUNK_ELEMS = 1 << 22
GOLDEN = 0.6180339887498949  # the hash weights' step: distinct weights in [-0.5, 0.5) for any C


def settled() -> bool:
    """Whether the matching settles exact ties: everywhere except while torch.export traces. An exported
    graph (ONNX, OpenVINO: no bitcast, no stable sort, int64 computed in 32 bits by OpenVINO's CPU plugin)
    ranks equal scores in its runtime's own order instead; it differs from eager only where tokens are
    bitwise identical or scores exactly equal."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return not (is_exporting is not None and is_exporting())


def min_alike(key: Tensor, value: Tensor) -> Tensor:
    """For each position of key [..., L], the smallest `value` ([..., L], integers) at a position with an
    equal key.

    Sorted along the last dim, O(L log L), then a minimum per run of equal keys; the sort need not be
    stable (ONNX has no stable sort), so exported graphs compute the same."""
    if key.shape[-1] == 0:
        return value.clone()
    order = key.argsort(dim=-1)
    ordered = key.gather(-1, order)
    starts = torch.cat([torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1)
    run = starts.to(torch.int64).cumsum(dim=-1) - 1  # each sorted position's run of equal keys
    values = value.gather(-1, order)
    lowest = torch.full_like(values, torch.iinfo(values.dtype).max).scatter_reduce(-1, run, values, "amin")
    low = lowest.gather(-1, run)
    return torch.empty_like(low).scatter_(-1, order, low)


def token_classes(m: Tensor, norm: Tensor) -> Tensor:
    """[B, N] int64: for each token of m [B, N, C] (fp32), the lowest index of a token bitwise identical to
    it (itself when none); norm [B, N]: m.norm(dim=-1), as the matching computes it.

    Tokens are grouped by (norm, a weighted sum of the row), which identical rows always share (one
    reduction order per row), then each is compared bit for bit with the first of its group: a chance
    coincidence of both never groups different tokens, it can only leave a duplicate ungrouped."""
    B, N, C = m.shape
    index = torch.arange(N, device=m.device).expand(B, N)
    if N == 0 or B == 0:
        return index.clone()
    weights = torch.frac(torch.arange(1, C + 1, device=m.device, dtype=torch.float32) * GOLDEN) - 0.5
    rows = max(1, CLASS_CHUNK_ELEMS // max(1, B * C))
    starts = range(0, N, rows)
    wsum = torch.cat([(m[:, s : s + rows] * weights).sum(-1) for s in starts], dim=1)
    key = (norm.contiguous().view(torch.int32).to(torch.int64) << 32) | (
        wsum.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)  # norm ≥ 0: below 2**63
    first = min_alike(key, index)
    bits = m.view(torch.int32)
    same = torch.cat([(bits.gather(1, first[:, s : s + rows, None].expand(-1, -1, C)) == bits[:, s : s + rows]).all(-1)
                      for s in starts], dim=1)
    return torch.where(same, first, index)


def lowest_alike(classes: Tensor) -> Tensor:
    """classes [B, L] (token classes at L positions) → [B, L] int64: the lowest position of the same class."""
    return min_alike(classes, torch.arange(classes.shape[-1], device=classes.device).expand_as(classes))


def settle(score: Tensor, pos: Tensor, classes: Tensor, norm: Tensor, dst_idx: Tensor, src_idx: Tensor) -> Tensor:
    """The matching's scores [B, S] made exact where equal pairs make them equal: one score per
    bitwise-identical pair of tokens (in either order) wherever it sits, and exactly 1 for a src identical to its dst
    (cos(x, x), whatever the rounding; not for a zero or non-finite token). pos: [B, S] dst positions;
    classes: token_classes [B, N]; norm: [B, N] token norms."""
    n = classes.shape[1]
    src_class, dst_class = classes[:, src_idx], classes.gather(1, dst_idx[pos])
    pair = torch.minimum(src_class, dst_class) * n + torch.maximum(src_class, dst_class)  # cos(x, y) = cos(y, x)
    score = score.gather(1, lowest_alike(pair))
    itself = (src_class == dst_class) & (norm[:, src_idx] > 0) & score.isfinite()
    return torch.where(itself, 1.0, score)


def select_keys(score: Tensor) -> Tensor:
    """[B, S] fp32 → [B, S] int64, unique per row: the order the r best src are picked in, as the CUDA plan
    kernel ranks them (csrc/rules.h select_key): every NaN above every number, −0.0 below +0.0, then
    the lower position on equal scores."""
    bits = score.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    ordered = torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)
    ordered = torch.where(score.isnan(), 0xFFFFFFFF, ordered)
    position = torch.arange(score.shape[-1], device=score.device)
    return ordered * 2**31 + (2**31 - 1 - position)
