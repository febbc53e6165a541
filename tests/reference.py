"""An independent reference for ToMe for SD (use_rand=False), from the paper's definition.

Written for clarity, not speed: per batch row, a dense float64 cosine score matrix, explicit loops
over src tokens, and explicit groups. It shares no code with tomesd.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch


def groups(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int) -> List[Dict[int, List[int]]]:
    """For each batch row: {kept token: [tokens averaged into it, itself first]}.

    Kept tokens are the dst (each sy × sx cell's top-left token) and the src that do not merge.
    """
    B, N, _ = metric.shape
    assert N == h * w
    dst = [(i * sy) * w + j * sx for i in range(h // sy) for j in range(w // sx)]
    dst_set = set(dst)
    src = [n for n in range(N) if n not in dst_set]
    r = min(r, len(src))
    out = []
    for b in range(B):
        m = metric[b].double()
        norms = [math.sqrt(float((m[n] * m[n]).sum())) for n in range(N)]
        unit = torch.stack([m[n] / norms[n] if norms[n] > 0 else m[n] * 0 for n in range(N)])
        scores = unit[src] @ unit[dst].T  # dense [S, D]
        best = []
        for i, s in enumerate(src):
            j = int(torch.argmax(scores[i]))
            best.append((float(scores[i, j]), s, dst[j]))
        best.sort(key=lambda t: -t[0])
        merging = best[:r]
        row = {n: [n] for n in range(N)}
        for _, s, d in merging:
            row[d].append(s)
            del row[s]
        out.append(row)
    return out


def merge_unmerge(x: torch.Tensor, row_groups: List[Dict[int, List[int]]]):
    """(merged [B, M, C] with rows in raster order of kept tokens, per-token group mean [B, N, C]), float64."""
    B, N, C = x.shape
    merged, spread = [], torch.zeros(B, N, C, dtype=torch.float64)
    for b, row in enumerate(row_groups):
        means = []
        for keep in sorted(row):
            mean = x[b, row[keep]].double().mean(dim=0)
            means.append(mean)
            for n in row[keep]:
                spread[b, n] = mean
        merged.append(torch.stack(means))
    return torch.stack(merged), spread
