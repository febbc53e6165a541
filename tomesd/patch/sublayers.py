"""A merged sub-layer's pre- and post-hook: find the block's plan, check the call can be merged, and
hand it to the sub-layer's Mode (merge before, unmerge after, or what the mode does instead)."""
from __future__ import annotations

from torch import Tensor, nn

from ..matching import MergePlan
from .args import get_arg
from .calls import plan_of
from .frames import SublayerCall
from .state import ModelState


def _rows(plan: MergePlan, start: int, stop: int) -> MergePlan:
    return MergePlan(slot=plan.slot[start:stop], counts=plan.counts[start:stop], num_out=plan.num_out)


def on_sublayer_call(state: ModelState, name: str, kind: str, module: nn.Module, args: tuple, kwargs: dict):
    block = state.block()
    if block is None or (block.request is None and block.plan is None):
        return None
    host = state.host
    for why in host.sublayer_refusals(module):
        state.warn_once(f"refused-{name}-{why}", f"tomesd: {name} is not merged in blocks where {why}")
        return None
    if kind == "self" and host.attention.masked(kwargs):
        state.warn_once("mask", "tomesd: a self-attention mask was passed to attn1; blocks called with one "
                        "are not merged (the mask is over unmerged tokens)")
        block.request = block.plan = None
        return None
    plan = plan_of(state, block)
    x, where = get_arg(args, kwargs, host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3:
        state.warn_once(f"shape-{name}", f"tomesd: {name} was called without [B, N, C] tokens; it is not merged")
        return None
    call = SublayerCall(name, kind, module, args, kwargs, x, where, warn=state.warn_once, slots=block.slots,
                        owner=state)
    mode = state.modes[name]
    B, N = plan.slot.shape
    if x.shape[1] != N and mode.takes_all_tokens(call) and kind == "self":
        state.warn_once(f"tokens-{name}", f"tomesd: {name} was called on {x.shape[1]} tokens, not its block's {N}: "
                        f"something between the block's input and {name} changed them (e.g. a ComfyUI attn1_patch "
                        "such as TomePatchModel's or HyperTile's); tomesd does not merge in such blocks")
        return None
    if x.shape[1] != N and mode.takes_all_tokens(call):
        state.warn_once(f"chunk-{name}", f"tomesd: {name} was called on {x.shape[1]} of a block's {N} tokens "
                        "(feed-forward chunking over the token axis, dim=1); a chunk cannot be merged on its own, so "
                        f"{name} runs unmerged, chunk by chunk, in such blocks. Chunk over the batch (dim=0) to merge it")
        return None
    if x.shape[0] == B:
        used = plan
    elif kind == "mlp" and block.rows_done + x.shape[0] <= B:
        # feed-forward chunking over the batch: this call holds the next rows of the block's batch
        used = _rows(plan, block.rows_done, block.rows_done + x.shape[0])
        block.rows_done += x.shape[0]
    else:
        state.warn_once(f"shape-{name}", f"tomesd: {name} was called with a batch of {x.shape[0]} rows, not the "
                        f"block's {B}; it is not merged there")
        return None
    why = mode.refusal(call)
    if why is not None:
        state.warn_once(f"refusal-{name}-{why}", f"tomesd: {why}; {name} is not merged there")
        return None
    args, kwargs = mode.enter(call, used)
    block.merged[name] = (used, call.kept)
    return args, kwargs


def on_sublayer_done(state: ModelState, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
    block = state.block()
    merged = block.merged.pop(name, None) if block is not None else None
    if merged is None:
        return None
    return state.modes[name].exit(output, *merged)
