"""Per-call state: what describes one denoiser call (CallContext), one block's merge within it
(MergeRequest, BlockCall, Record) and one merged sub-layer's call (SublayerCall), and the per-thread
stack of open calls (Calls). Nothing here knows a model, a host or a mode: those hold or receive these.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..matching import MergePlan
from .args import set_arg


@dataclass
class MergeRequest:
    """A block call's merge, resolved but not yet planned: the metric [B, N, C] on the h × w grid of
    level /downsample (its h·w tokens after the first `head`; the `head` tokens before them and the `tail`
    tokens after them pass through unmerged), r tokens to merge, the block's random key (None: each
    cell's first token)."""

    metric: Tensor
    h: int
    w: int
    r: int
    key: Optional[Tensor]
    downsample: int = 1
    head: int = 0
    tail: int = 0


@dataclass
class BlockCall:
    """One block's merge within one denoiser call (block `index` of the host's blocks).

    request: what to plan, until the block's first merged sub-layer builds `plan` from it.
    merged: sub-layer name → (the plan its input was merged with (its rows, for a batch chunk), what
    its mode's enter kept for its exit: SublayerCall.kept), until its output is unmerged. slots:
    per-sub-layer objects a host's attention leaves between a sub-layer's pre-hook and its wrapped
    processor (what the SDPA call must do: SublayerCall.leave). rows_done: batch rows of `ff` already
    run in this call (feed-forward chunked over the batch). pushed: the block's entry opened a
    recompute context, which its exit closes.
    """

    index: int = 0
    request: Optional[MergeRequest] = None
    plan: Optional[MergePlan] = None
    merged: Dict[str, Tuple[MergePlan, Any]] = field(default_factory=dict)
    slots: Dict[str, Any] = field(default_factory=dict)
    rows_done: int = 0
    pushed: bool = False


@dataclass
class Record:
    """What a merged block's input was in a call with gradients, to find the call in a recompute.

    ref: weak reference to the input; layout: (shape, dtype, device); memory: (stride, data_ptr,
    version); probe: a strided sample of its values [B, ≤8, ≤8] fp32; plan: the plan the block merged
    with (a recompute replays it, whether it was built, shared or reused in the forward). ref and
    memory are None for a call recorded inside compiled code.
    """

    ref: Optional["weakref.ref[Tensor]"]
    layout: tuple
    memory: Optional[tuple]
    probe: Tensor
    plan: Optional[MergePlan] = None


@dataclass
class CallContext:
    """One denoiser call: latent size, random key, and what was resolved during it.

    height, width: the latent's size; grid_h, grid_w: its token grid at level 1 (latent / patch size).
    timestep: the call's timestep tensor (or number), if any. levels: token count → (downsample, h, w)
    of the level with that many tokens (None: no level). ratios: level → resolved ratio. block: the
    BlockCall of the block running now (blocks never nest; sub-layer hooks find it here, so they carry
    no per-block constant and compiled code is shared between blocks). records: block index → Record, for calls made with
    gradients (None otherwise). recompute: this is a copy opened by a checkpoint recompute of one
    block. shared: level → the plan its blocks share in this call (share_plan). head, tail: tokens that
    precede / follow the image grid in each block's sequence and pass through unmerged (Flux Kontext's
    reference image).
    """

    height: int
    width: int
    grid_h: int
    grid_w: int
    key: Optional[Tensor]
    timestep: Any = None
    levels: Dict[int, Optional[Tuple[int, int, int]]] = field(default_factory=dict)
    ratios: Dict[int, float] = field(default_factory=dict)
    block: Optional[BlockCall] = None
    records: Optional[Dict[int, Record]] = None
    recompute: bool = False
    shared: Dict[int, MergePlan] = field(default_factory=dict)
    head: int = 0
    tail: int = 0


class Calls(threading.local):
    """Per thread: `frames`, the stack of open CallContexts (None for a root call that merges
    nothing). Every attribute exists from a thread's first access, so compiled code guarding on them
    sees the same layout at every call."""

    def __init__(self):
        self.frames: List[Optional[CallContext]] = []

    def __reduce__(self):  # a copy of a patched model starts with no open call
        return (Calls, ())


@dataclass
class SublayerCall:
    """One call of a merged sub-layer, as a mode and a host's attention see it: the sub-layer's name,
    kind (a Sublayer kind: "self", "cross", "mlp") and module, its arguments, and its input tokens x
    [B, N, C] (found at `where` among the arguments: a position or a keyword).

    warn(tag, message): warn once per model and tag. slots: the block's per-sub-layer slots, where a
    sub-layer's pre-hook leaves what its wrapped attention processor must do in this call (`leave`).
    kept: what the mode's enter keeps for its exit (a whole block's unmerged and merged input).
    owner: the patch this call runs under, opaque (the processor wrappers it made carry it: only those
    take what is left in a slot).
    """

    name: str
    kind: str
    module: nn.Module
    args: tuple
    kwargs: dict
    x: Tensor
    where: Any
    warn: Callable[[str, str], None]
    slots: Dict[str, Any]
    kept: Any = None
    owner: Any = None

    def with_input(self, value: Tensor) -> Tuple[tuple, dict]:
        """The call's (args, kwargs) with its input tokens replaced by value."""
        return set_arg(self.args, self.kwargs, self.where, value)

    def leave(self, value: Any, name: Optional[str] = None) -> None:
        """Leave `value` in this sub-layer's slot (or in the slot of the block's attention `name`, for a
        whole block) for its wrapped processor (it takes it during the call)."""
        self.slots[self.name if name is None else name] = value
