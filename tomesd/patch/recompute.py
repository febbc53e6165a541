"""Finding a denoiser call again when gradient checkpointing recomputes one of its blocks.

A checkpoint recomputes a block in backward, after the root call has returned. A call made with
gradients records, per merged block, what its input was (a weak reference, its memory and a small
probe of its values), and the call's context stays findable exactly as long as the autograd graph
of its output is alive (the graph node holds it; the model keeps only weak references). A block
entered outside any root call with gradients enabled finds its call here — by the very input tensor
when the checkpoint saved it, else by the probe — and recomputes with that call's level, ratio and
random key, and the very plan of the forward. When that cannot be decided, it raises instead of
guessing.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..matching import MergePlan
from .frames import CallContext, Record
from .state import ModelState

# Key under which a call's context rides on its output's autograd node (Node.metadata).
GRAPH_KEY = "tomesd_calls"
# A recompute's input matches a recorded probe when max |Δ| ≤ PROBE_RTOL · max |probe| (+ PROBE_ATOL):
# loose enough for non-deterministic kernels in the recompute, far below what separates two calls.
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-6


@torch.compiler.disable
def keep_for_backward(state: ModelState, ctx: CallContext, output: Optional[Tensor]) -> None:
    """Keep a call with gradients findable by checkpoint recomputes while its output's graph lives."""
    node = getattr(output, "grad_fn", None)
    if node is None:
        return  # nothing can backpropagate into this call
    node.metadata.setdefault(GRAPH_KEY, []).append(ctx)
    with state.lock:
        state.live[next(state.ids)] = ctx


def live_calls(state: ModelState) -> List[CallContext]:
    with state.lock:
        return list(state.live.values())


def _layout(x: Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.device)


def _memory(x: Tensor) -> tuple:
    return (tuple(x.stride()), x.data_ptr(), x._version)


def _probe(x: Tensor) -> Tensor:
    B, N, C = x.shape
    return x.detach()[:, :: max(1, N // 8)][:, :8, :: max(1, C // 8)][:, :, :8].float().clone()


def record(ctx: CallContext, index: int, x: Tensor) -> None:
    """Remember block `index`'s input x [B, N, C] in a call with gradients. Inside compiled code (training
    a compiled model) without a graph break: its layout and probe only (tensor ops; a weak reference and
    the memory of a traced tensor are no values), so a recompute finds that call by the probe."""
    eager = not torch.compiler.is_compiling()
    ctx.records[index] = Record(ref=weakref.ref(x) if eager else None, layout=_layout(x),
                                memory=_memory(x) if eager else None, probe=_probe(x))


def _probe_matches(rec: Record, probe: Tensor) -> bool:
    want = rec.probe.to(probe.device)
    if want.shape != probe.shape:
        return False
    return bool(((want - probe).abs().max() <= PROBE_RTOL * want.abs().max() + PROBE_ATOL).item())


def _same_merge(calls: List[CallContext]) -> bool:
    """True if these calls merge any given input identically (same partition and ratios)."""
    first = calls[0]
    for c in calls[1:]:
        if (c.grid_h, c.grid_w, c.ratios) != (first.grid_h, first.grid_w, first.ratios):
            return False
        if (c.key is None) != (first.key is None):
            return False
        if c.key is not None and not torch.equal(c.key.cpu(), first.key.cpu()):
            return False
    return True


@torch.compiler.disable
def find_call(state: ModelState, index: int, x: Tensor) -> Optional[Tuple[CallContext, Optional[MergePlan]]]:
    """(a copy of the context of the call whose block `index` is being recomputed with input x, the
    plan the block merged with there), or None if no live call merged that block with an input like x
    (then the forward did not merge it either).

    The only call that merged the block with x's shape is it. Among several, the recorded input itself,
    still alive at x's memory and version, decides (a checkpoint saved it); else the calls whose probe
    matches x's values, narrowed to the one whose input had x's memory (a reentrant checkpoint that
    dropped the original but kept its storage). RuntimeError when calls that merge differently remain.
    """
    calls = [c for c in live_calls(state) if c.records and index in c.records]
    layout, memory = _layout(x), _memory(x)
    calls = [c for c in calls if c.records[index].layout == layout]
    if len(calls) > 1:
        same = [c for c in calls if c.records[index].memory == memory]
        alive = [c for c in same if c.records[index].ref is not None and c.records[index].ref() is not None]
        if alive:
            calls = alive
        else:  # the input was freed: its memory may since hold another tensor, so the values decide
            probe = _probe(x)
            close = [c for c in calls if _probe_matches(c.records[index], probe)]
            calls = [c for c in close if any(c is s for s in same)] or close or calls
    if len(calls) > 1 and not _same_merge(calls):
        raise RuntimeError(
            f"tomesd: transformer block {index} is being recomputed (gradient checkpointing) but {len(calls)} "
            "forward calls with gradients match its input, so the partition of its forward is unknown. Run "
            "backward before the next forward with gradients, or patch with use_rand=False."
        )
    if not calls:
        return None
    found = calls[-1]
    return dataclasses.replace(found, block=None, records=None, recompute=True, shared={}), found.records[index].plan
