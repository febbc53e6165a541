"""Token Merging for SD in plain PyTorch: partition, similarity, MergePlan, merge and unmerge.

Layouts: tokens x are [B, N, C] in raster order of an h × w grid (N = h·w). A MergePlan maps every
input token n to an output row slot[b, n] in [0, M), M = N − r. merge(x) is the segment mean of x
over slot ([B, N, C] → [B, M, C]); unmerge(y) is the gather y[b, slot[b, n]] ([B, M, C] → [B, N, C]).
Output rows are the kept tokens (every dst and every unmerged src) in raster order.

Nothing here imports diffusers; the CUDA ops in csrc/ implement the same contract (see ops.py).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ties
from .keys import cell_choices

# Element budget of one [B, rows, D] fp32 score tile: 2**24 elements = 64 MiB.
SCORE_TILE_ELEMS = 1 << 24
# Local matching's neighbourhoods kept (one per window and device, least recently used dropped first).
NEIGHBOURHOOD_CACHE_SIZE = 8


@dataclass(frozen=True)
class MergePlan:
    """Where each token goes, for one transformer block call.

    slot:     [B, N] int64, output row of each input token, in [0, M)
    counts:   [B, M] int32, number of input tokens averaged into each output row (≥ 1)
    num_out:  M = N − r
    offsets, members: optional CSR of slot, built by the CUDA backend ([B, M + 1] and [B, N] int32):
              output row m holds tokens members[b, offsets[b, m] : offsets[b, m + 1]], in raster order
    anchor:   optional [B, M] int64, the kept token of each output row (its dst, or the unmerged src
              itself): where the row's merged token sits (rotary positions follow it); see `anchors`
    """

    slot: Tensor
    counts: Tensor
    num_out: int
    offsets: Optional[Tensor] = None
    members: Optional[Tensor] = None
    anchor: Optional[Tensor] = None

    @property
    def num_in(self) -> int:
        return self.slot.shape[1]


def dst_offsets(h: int, w: int, sx: int, sy: int, key: Optional[Tensor], device) -> Tensor:
    """Position of the dst token inside each sy × sx cell: [h//sy, w//sx] int64 in [0, sy·sx).

    key: int64 scalar tensor in [0, 2**32) (a pure function of seed, block and timestep; or its [2]
    limbs, keys.step_key(limbs=True)), or None for the deterministic choice (every cell's first token).
    """
    hsy, wsx = h // sy, w // sx
    if key is None:
        return torch.zeros(hsy, wsx, dtype=torch.int64, device=device)
    return cell_choices(key, hsy * wsx, sx * sy, device).view(hsy, wsx)


def partition(h: int, w: int, sx: int, sy: int, key: Optional[Tensor], device) -> Tuple[Tensor, Tensor]:
    """Split the h × w grid into dst (one per sy × sx cell of the top-left region) and src.

    Returns (dst_idx [D], src_idx [S]), int64 token indices in raster order, D = (h//sy)·(w//sx),
    S = h·w − D. Tokens outside the top-left (h//sy·sy) × (w//sx·sx) region are src.
    """
    hsy, wsx = h // sy, w // sx
    off = dst_offsets(h, w, sx, sy, key, device)
    rows = torch.arange(hsy, device=device)[:, None] * sy + off // sx
    cols = torch.arange(wsx, device=device)[None, :] * sx + off % sx
    is_dst = torch.zeros(h * w, dtype=torch.int64, device=device)
    is_dst[(rows * w + cols).flatten()] = 1
    num_src = h * w - hsy * wsx
    # src in raster order, then dst in raster order (a stable sort of is_dst, with no sort: ONNX has none)
    pos = torch.where(is_dst == 1, num_src + is_dst.cumsum(0) - 1, (1 - is_dst).cumsum(0) - 1)
    order = torch.zeros_like(pos).scatter_(0, pos, torch.arange(h * w, device=device))
    return order[num_src:], order[:num_src]


def best_dst(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, tile_elems: int = SCORE_TILE_ELEMS):
    """For each src token, its most similar dst by cosine similarity.

    metric: [B, N, C]; returns (score [B, S] fp32, dst position [B, S] int64 indexing dst_idx).
    Scores are computed in fp32 tile by tile over src rows, so the [S, D] matrix is never held
    whole when it exceeds `tile_elems`. Zero-norm tokens score 0 against everything.

    Ties (tomesd.ties): the first NaN, else the lowest dst position among equal scores, and among
    bitwise-identical dst the lowest position whatever the matmul's rounding; bitwise-identical src get
    the same dst, identical (src, dst) pairs the same score, a src identical to its dst exactly 1.
    """
    m = metric.float()
    norm = m.norm(dim=-1, keepdim=True)
    exact = ties.settled()
    classes = ties.token_classes(m, norm[..., 0]) if exact else None
    m = m / norm.clamp_min(1e-12)
    a = m[:, src_idx]
    bt = m[:, dst_idx].transpose(1, 2)
    B, S, _ = a.shape
    rows = max(1, tile_elems // max(1, B * bt.shape[-1]))
    vals, idxs = [], []
    for start in range(0, S, rows):
        v, i = (a[:, start : start + rows] @ bt).max(dim=-1)
        vals.append(v)
        idxs.append(i)
    score, pos = (vals[0], idxs[0]) if len(vals) == 1 else (torch.cat(vals, dim=1), torch.cat(idxs, dim=1))
    if not exact:
        return score, pos
    pos = ties.lowest_alike(classes[:, dst_idx]).gather(1, pos)  # an identical dst at a lower position
    twin = ties.lowest_alike(classes[:, src_idx])  # the first src identical to each
    pos = pos.gather(1, twin)
    return ties.settle(score.gather(1, twin), pos, classes, norm[..., 0], dst_idx, src_idx), pos


@dataclass(frozen=True)
class LocalWindow:
    """Local matching on an h × w grid of sy × sx cells: a src token's candidates are the dst of the
    k × k cells around its own cell (|cy' − cy| ≤ k // 2, |cx' − cx| ≤ k // 2, clipped at the grid's
    edges). Tokens of the remainder rows / columns belong to the nearest (last) cell. k odd ≥ 1."""

    h: int
    w: int
    sx: int
    sy: int
    k: int

    @property
    def cells(self) -> Tuple[int, int]:
        """(cells along y, cells along x) = (h // sy, w // sx)."""
        return self.h // self.sy, self.w // self.sx

    def covers_grid(self) -> bool:
        """Whether every dst is a candidate of every src (k ≥ 2·max(cells per side) − 1): the global matching."""
        return self.k >= 2 * max(self.cells) - 1


class Neighbourhood(NamedTuple):
    """Key-independent layout of a LocalWindow on one device (cached per grid shape).

    cell_of:  [N] int64, cell of each token (raster order of cells, remainder tokens in the last cell)
    members:  [D, P] int64, tokens of each cell (padded with N), P = (sy + h % sy)·(sx + w % sx)
    near:     [D, K] int64, the cells of each cell's window in raster order (D where it leaves the grid);
              K = min(k, 2·hsy − 1)·min(k, 2·wsx − 1)
    """

    cell_of: Tensor
    members: Tensor
    near: Tensor


def capturing(device) -> bool:
    """Whether the current stream of `device` is capturing a CUDA graph: a tensor made then holds its
    values only once the graph replays."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class NeighbourhoodCache:
    """The Neighbourhoods of the last `size` (window, device) pairs used, least recently used dropped
    first (thread-safe). Its users `hold` it (weakly: a patched model's plan provider) and `release` it;
    the last release empties it. Never read or filled while tracing or inside a CUDA-graph capture
    (`capturing`, the seam tests replace): a capture builds its own, which lives in the graph's memory,
    and no cached tensor holds values written only at replay or is read by a graph after the cache
    dropped it."""

    def __init__(self, size: int = NEIGHBOURHOOD_CACHE_SIZE, capturing=capturing):
        self.size = size
        self.capturing = capturing
        self._entries: "OrderedDict[tuple, Neighbourhood]" = OrderedDict()
        self._holders: "weakref.WeakSet" = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self, win: LocalWindow, device) -> Neighbourhood:
        """The Neighbourhood of `win` on `device`, built on first use (outside inference mode, so a cached
        one serves calls that track gradients too)."""
        device = torch.device(device)
        if torch.compiler.is_compiling() or self.capturing(device):
            return _neighbourhood(win, device)
        key = (win, str(device))
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        with torch.inference_mode(False):
            made = _neighbourhood(win, device)
        if all(type(t) is Tensor for t in made):  # no fake tensors
            with self._lock:
                self._entries[key] = made
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return made

    def keys(self) -> Tuple[tuple, ...]:
        """(window, device) of the kept neighbourhoods, least recently used first."""
        with self._lock:
            return tuple(self._entries)

    def hold(self, owner) -> None:
        """`owner` (weakly referenced) uses the cache."""
        with self._lock:
            self._holders.add(owner)

    def release(self, owner) -> None:
        """`owner` no longer uses the cache; when no holder is left, it empties."""
        with self._lock:
            self._holders.discard(owner)
            if not len(self._holders):
                self._entries.clear()


NEIGHBOURHOODS = NeighbourhoodCache()  # the process's cache


def neighbourhood(win: LocalWindow, device) -> Neighbourhood:
    """The Neighbourhood of `win` on `device`, from the process's cache (NEIGHBOURHOODS)."""
    return NEIGHBOURHOODS.get(win, device)


def _neighbourhood(win: LocalWindow, device) -> Neighbourhood:
    h, w, sx, sy = win.h, win.w, win.sx, win.sy
    hsy, wsx = win.cells
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    cy, cx = (rows // sy).clamp_max(hsy - 1), (cols // sx).clamp_max(wsx - 1)
    cell_of = (cy[:, None] * wsx + cx[None, :]).flatten()
    py, px = sy + h % sy, sx + w % sx  # largest cell (the last row / column takes the remainder)
    within = ((rows - cy * sy)[:, None] * px + (cols - cx * sx)[None, :]).flatten()
    D, P = hsy * wsx, py * px
    members = torch.full((D * P,), h * w, dtype=torch.int64, device=device)
    members[cell_of * P + within] = torch.arange(h * w, device=device)
    half = win.k // 2
    ky, kx = min(win.k, 2 * hsy - 1), min(win.k, 2 * wsx - 1)  # offsets beyond the grid never hit
    dy = torch.arange(ky, device=device) - min(half, hsy - 1)
    dx = torch.arange(kx, device=device) - min(half, wsx - 1)
    ny = torch.arange(hsy, device=device)[:, None, None, None] + dy[None, None, :, None]
    nx = torch.arange(wsx, device=device)[None, :, None, None] + dx[None, None, None, :]
    inside = (ny >= 0) & (ny < hsy) & (nx >= 0) & (nx < wsx)
    near = torch.where(inside, ny * wsx + nx, D).reshape(D, ky * kx)
    return Neighbourhood(cell_of, members.view(D, P), near)


def best_dst_local(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, win: LocalWindow,
                   tile_elems: int = SCORE_TILE_ELEMS) -> Tuple[Tensor, Tensor]:
    """best_dst with each src's candidates restricted to the dst of the k × k cells around its cell.

    metric: [B, N, C], N = h·w; dst_idx: one token per cell of the top-left (h//sy·sy) × (w//sx·sx)
    region (as `partition` gives). Returns (score [B, S] fp32, dst position [B, S] int64), ties broken
    as best_dst (the lowest dst position; NaN first; among bitwise-identical candidates the lowest
    position; identical src of one cell alike; identical (src, dst) pairs one score; a src identical to
    its dst exactly 1).
    O(N·k²·C) work; cells are scored in chunks of [B, cells, P, K] so that the gathered dst rows
    [B, cells, K, C] stay within `tile_elems`: nothing of size N × N is allocated.
    """
    B, N, C = metric.shape
    if min(win.cells) < 1:
        raise ValueError(f"tomesd: a {win.h} x {win.w} grid has no {win.sy} x {win.sx} cell, so no dst to match")
    nb = neighbourhood(win, metric.device)
    D, P = nb.members.shape
    K = nb.near.shape[1]
    m = metric.float()
    norm = m.norm(dim=-1)
    exact = ties.settled()
    classes = ties.token_classes(m, norm) if exact else torch.arange(N, device=m.device).expand(B, N)
    padded = torch.cat([classes, classes.new_full((B, 1), -1)], dim=1)  # [B, N + 1], class -1 for padding
    inv = torch.cat([1 / norm.clamp_min(1e-12), m.new_zeros(B, 1)], dim=1)  # [B, N + 1], 0 for padding
    cells = nb.cell_of[dst_idx]
    cell_pos = torch.full((D + 1,), D, dtype=torch.int64, device=metric.device)  # index D: outside the grid
    cell_pos[cells] = torch.arange(D, device=metric.device)  # dst position of each cell
    cell_tok = torch.full((D + 1,), N, dtype=torch.int64, device=metric.device)
    cell_tok[cells] = dst_idx  # dst token of each cell
    cand_pos = cell_pos[nb.near]  # [D, K] dst position of each candidate, D outside the grid
    cand_tok = cell_tok[nb.near]  # its token, N outside the grid
    score = m.new_empty(B, N + 1)
    pos = torch.empty(B, N + 1, dtype=torch.int64, device=metric.device)
    chunk = max(1, tile_elems // max(1, B * ((K + P) * C + 2 * P * K)))
    for c0 in range(0, D, chunk):
        c1 = min(D, c0 + chunk)
        tok, cand = nb.members[c0:c1], cand_tok[c0:c1]  # [cells, P], [cells, K]; N: padding
        dots = m[:, tok.clamp_max(N - 1)] @ m[:, cand.clamp_max(N - 1)].transpose(-1, -2)  # [B, cells, P, K]
        s = dots * inv[:, tok][..., None] * inv[:, cand][:, :, None, :]  # cosine, 0 for padding
        s = s.masked_fill(cand_pos[c0:c1, None, :] == D, float("-inf"))
        best = s.max(dim=-1, keepdim=True).values
        hit = (s == best) | (s.isnan() & best.isnan())
        positions = cand_pos[c0:c1].expand(B, -1, -1)
        flat = tok.flatten()
        if not exact:  # exported: the lowest position among the best, no identical tokens grouped
            score[:, flat] = best[..., 0].flatten(1)
            pos[:, flat] = torch.where(hit, positions[:, :, None, :], D).amin(dim=-1).flatten(1)
            continue
        lowest = ties.min_alike(padded[:, cand], positions)  # [B, cells, K]: lowest identical candidate
        first = torch.where(hit, lowest[:, :, None, :], D).amin(dim=-1)
        twin = ties.lowest_alike(padded[:, tok])  # [B, cells, P]: the first identical token of the cell
        score[:, flat] = best[..., 0].gather(2, twin).flatten(1)
        pos[:, flat] = first.gather(2, twin).flatten(1)
    pos = pos[:, src_idx]
    if not exact:
        return score[:, src_idx], pos
    return ties.settle(score[:, src_idx], pos, classes, norm, dst_idx, src_idx), pos


def plan_from_matches(score: Tensor, dst_pos: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int, n: int) -> MergePlan:
    """Merge the r src tokens with the highest score into their best dst; build the slot map.

    score, dst_pos: [B, S] from best_dst; 0 < r ≤ S. Equal scores at the r-th place: the lower src
    positions merge (every NaN first), as in the CUDA plan kernel.
    """
    B = score.shape[0]
    device = score.device
    ranked = ties.select_keys(score) if ties.settled() else score  # exported: the runtime's order on equal scores
    merged_pos = ranked.topk(r, dim=-1, sorted=False).indices  # src rows that merge [B, r]
    src_tok = src_idx[merged_pos]  # token index of each merging src
    dst_tok = dst_idx[dst_pos.gather(1, merged_pos)]  # token index of its dst
    merged = torch.zeros(B, n, dtype=torch.bool, device=device).scatter_(1, src_tok, True)
    rank = (~merged).cumsum(dim=1) - 1  # output row of each kept token (raster order)
    dst_slot = rank.gather(1, dst_tok)
    slot = rank.scatter(1, src_tok, dst_slot)
    counts = torch.ones(B, n - r, dtype=torch.int32, device=device)
    counts.scatter_add_(1, dst_slot, torch.ones_like(dst_slot, dtype=torch.int32))
    return MergePlan(slot=slot, counts=counts, num_out=n - r)


def anchors(plan: MergePlan, dst_idx: Tensor) -> Tensor:
    """[B, M] int64: the kept token of each output row of `plan` (made on a grid whose dst tokens are
    dst_idx [D]): a dst, or a src that merged into nothing. Output rows are the kept tokens in raster
    order, and a src is kept exactly when it is alone in its row."""
    B, N = plan.slot.shape
    is_dst = torch.zeros(N, dtype=torch.bool, device=plan.slot.device).index_fill_(0, dst_idx, True)
    kept = is_dst[None, :] | (plan.counts.gather(1, plan.slot.long()) == 1)
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept tokens first, raster order
    return order[:, : plan.num_out]


def build_plan(metric: Tensor, dst_idx: Tensor, src_idx: Tensor, r: int,
               window: Optional[LocalWindow] = None) -> MergePlan:
    """MergePlan for metric [B, N, C] given the partition; 0 < r ≤ len(src_idx).

    window: local matching (best_dst_local); None or a window covering the grid: global (best_dst).
    """
    with torch.no_grad():
        if window is None or window.covers_grid():
            score, dst_pos = best_dst(metric, dst_idx, src_idx)
        else:
            score, dst_pos = best_dst_local(metric, dst_idx, src_idx, window)
        return plan_from_matches(score, dst_pos, dst_idx, src_idx, r, metric.shape[1])


def _flat_rows(plan: MergePlan) -> Tensor:
    """[B·N] row of each token in the flattened [B·M, C] output (whole-row index ops beat gather)."""
    B = plan.slot.shape[0]
    offsets = torch.arange(B, device=plan.slot.device)[:, None] * plan.num_out
    return (plan.slot + offsets).flatten()


def merge(x: Tensor, plan: MergePlan, mean: bool = True) -> Tensor:
    """Segment mean (mean=False: sum) by slot: x [B, N, C] → [B, M, C].

    The one CPU segment reduction: the PyTorch path and the CPU impl of torch.ops.tomesd.merge.
    Sums accumulate in fp32 (fp64 for fp64 input), as the CUDA kernels do: a flat region can send
    thousands of tokens to one dst, whose fp16 sum would overflow (65504) or lose precision.
    """
    B, N, C = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(B * plan.num_out, C, dtype=acc, device=x.device)
    out.index_add_(0, _flat_rows(plan), x.reshape(B * N, C).to(acc))
    out = out.view(B, plan.num_out, C)
    return (out / plan.counts[..., None] if mean else out).to(x.dtype)


def unmerge(y: Tensor, plan: MergePlan) -> Tensor:
    """Copy each output row back to every token it holds: y [B, M, C] → [B, N, C]."""
    B, M, C = y.shape
    return y.reshape(B * M, C).index_select(0, _flat_rows(plan)).view(B, plan.num_in, C)
