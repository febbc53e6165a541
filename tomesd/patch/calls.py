"""The life of one denoiser call: the root's hooks open and close its CallContext, each block's
entry resolves its level, ratio and random key into a MergeRequest (planned lazily, by the block's
first merged sub-layer), and its exit closes it.

A root call never nests in itself: a stack still open when a root call starts was left by an
interrupted call and is dropped. A block entered outside any root call with gradients enabled is a
checkpoint recompute and finds its call through `recompute.find_call`.
"""
from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .. import keys
from ..matching import MergePlan
from . import recompute
from .args import first_tensor, get_arg
from .compiled import check_exportable, exporting
from .levels import level_of
from .frames import BlockCall, CallContext, MergeRequest
from .state import ModelState, call_ended, call_started, log_once


def on_root_call(state: ModelState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    exported = exporting()
    if exported:
        check_exportable(state.config)
    elif not torch.compiler.is_compiling():
        call_started(state)
    host = state.host
    frames = state.frames
    if frames:  # left open by an interrupted call
        frames.clear()
        state.plans.drop()
    sample, _ = get_arg(args, kwargs, host.sample_names, state.sample_pos)
    size = host.locate(args, kwargs) if isinstance(sample, Tensor) else None
    if isinstance(size, str):  # the host found its token layout but cannot merge on it
        state.warn_once(f"layout-{size}", f"tomesd: {type(module).__name__} was called with {size}; token "
                        "merging is off for such calls")
        frames.append(None)
        return
    if size is None and isinstance(sample, Tensor) and sample.ndim in (4, 5):
        size = sample.shape[-2], sample.shape[-1]
    if size is None:
        state.warn_once("root-input", f"tomesd: {type(module).__name__} was called without a latent "
                        f"[B, C, H, W] or [B, C, F, H, W] as its sample argument ({' / '.join(host.sample_names)}); "
                        "token merging is off for such calls")
        frames.append(None)
        return
    timestep, _ = get_arg(args, kwargs, host.timestep_names, state.timestep_pos)
    key = keys.step_key(state.base_key, timestep, sample.device, limbs=exported) if state.config.use_rand else None
    H, W = size[:2]
    p = host.patch_size
    records = {} if torch.is_grad_enabled() and not exported else None  # an exported program has no recompute
    head, tail = size[2:] if len(size) > 2 else (0, 0)
    ctx = CallContext(height=H, width=W, grid_h=H // p, grid_w=W // p, key=key, timestep=timestep, records=records,
                      head=head, tail=tail)
    state.plans.begin_call(ctx)
    frames.append(ctx)


@torch.compiler.disable
def on_root_call_eager(state: ModelState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """on_root_call outside compiled code, for a host that reads its token layout from input values (Flux's
    img_ids): torch.compile(model) runs root hooks outside its graph, so this costs no graph break there;
    a compiled region around the model call breaks once here."""
    on_root_call(state, module, args, kwargs)


def root_pre_hook(state: ModelState):
    """The root's forward pre-hook (with_kwargs) for state's host: on_root_call, or for a host that reads
    input values (Flux's img_ids) on_root_call_eager, which torch.compile runs outside its graph."""
    return partial(on_root_call_eager if getattr(state.host, "reads_inputs", False) else on_root_call, state)


@contextlib.contextmanager
def traced_root(state: ModelState) -> Iterator[None]:
    """Inside, the root's pre-hook is on_root_call itself, which torch.export traces (strict export too)
    while the host takes its input values from the example inputs (Host.export_inputs); the eager hook
    is back after."""
    hooks = state.host.root._forward_pre_hooks
    keys = [k for k, h in hooks.items() if isinstance(h, partial) and h.func is on_root_call_eager and h.args[0] is state]
    for key in keys:
        hooks[key] = partial(on_root_call, state)
    try:
        yield
    finally:
        for key in keys:
            if key in hooks:
                hooks[key] = partial(on_root_call_eager, state)


def on_root_done(state: ModelState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    if not torch.compiler.is_compiling():
        call_ended(state)
    frames = state.frames
    ctx = frames.pop() if frames else None
    if output is None:  # the forward raised (always_call hooks run with no output)
        state.plans.drop()
        frames.clear()
        return
    if ctx is not None and ctx.records:
        recompute.keep_for_backward(state, ctx, first_tensor(output))


@torch.compiler.disable
def _timestep_value(timestep, scale: float) -> Optional[float]:
    """The call's timestep on the 0–1000 scale, as a float for a ratio callable that takes it (one host
    sync per call). One ratio (one r) serves the whole batch, so the samples must share their timestep."""
    if timestep is None:
        return None
    t = torch.as_tensor(timestep).reshape(-1)
    lo, hi = torch.stack([t.min(), t.max()]).double().tolist()
    if lo != hi:
        raise ValueError(f"tomesd: the ratio callable takes `timestep`, but this call's samples have different "
                         f"timesteps (from {lo * scale:g} to {hi * scale:g}); one ratio (one number of merged tokens) "
                         "serves the whole batch. Call the model with one timestep for all samples, or use a ratio "
                         "without a timestep parameter")
    return lo * scale


def _ratio(state: ModelState, ctx: CallContext, downsample: int) -> float:
    schedule = state.config.schedule
    level = downsample if schedule.fn_takes_level else 0
    if level not in ctx.ratios:
        scale = state.host.vae_scale_factor
        t = _timestep_value(ctx.timestep, state.host.timestep_scale) if schedule.fn_takes_timestep else None
        ctx.ratios[level] = schedule.resolve(ctx.height * scale, ctx.width * scale, downsample, t)
    return ctx.ratios[level]


def _open(state: ModelState, index: int, x) -> Optional[tuple]:
    """(the call block `index` runs in, the plan to replay or None); None if it runs in none."""
    frames = state.frames
    if frames and frames[-1] is not None and frames[-1].recompute:
        frames.pop()  # a recompute interrupted inside its block: blocks never nest
    if frames:
        ctx = frames[-1]
        return None if ctx is None else (ctx, None)  # None: the root's latent was not found (warned there)
    recomputing = torch.is_grad_enabled() and isinstance(x, Tensor) and not exporting()
    found = recompute.find_call(state, index, x) if recomputing else None
    if found is None:
        if not any(c.records for c in recompute.live_calls(state)):
            state.warn_once(f"no-root-{index}", f"tomesd: transformer block {index} was called outside a "
                            f"call of {type(state.host.root).__name__}, so its token grid is unknown; it is not "
                            "merged in such calls")
        return None
    frames.append(found[0])
    return found


def enter_block(state: ModelState, index: int, x, refusal=None) -> None:
    """A block starts: open its BlockCall in the current call (or in its recompute's call). refusal():
    why the block must not merge in this call (Host.call_refusal), or None; asked only where it would."""
    opened = _open(state, index, x)
    if opened is None:
        return
    ctx, replay = opened
    block = ctx.block = BlockCall(index=index, pushed=ctx.recompute)
    if replay is not None:
        block.plan = replay  # the very plan of the forward
        return
    request = _request(state, ctx, index, x)
    why = refusal() if request is not None and refusal is not None else None
    if why is not None:
        state.warn_once(f"refused-block-{index}", f"tomesd: transformer block {index} is not merged in calls where {why}")
    elif request is not None:
        block.request = request
        if ctx.records is not None:
            recompute.record(ctx, index, x)


def _request(state: ModelState, ctx: CallContext, index: int, x) -> Optional[MergeRequest]:
    """What block `index` merges in call ctx (level, r, key), or None if it merges nothing."""
    if not isinstance(x, Tensor) or x.ndim != 3:
        state.warn_once(f"block-input-{index}", f"tomesd: transformer block {index} was called "
                        "without [B, N, C] tokens as hidden_states; it is not merged")
        return None
    x = state.host.image_tokens(index, x, ctx.head + ctx.grid_h * ctx.grid_w + ctx.tail)
    B, N, _ = x.shape
    n = N - ctx.head - ctx.tail  # image-grid tokens; head and tail pass through (identity slots of the plan)
    if n not in ctx.levels:
        ctx.levels[n] = level_of(ctx.grid_h, ctx.grid_w, n)
    level = ctx.levels[n]
    if level is None:
        aside = ctx.head + ctx.tail
        after = f" (after {aside} reference tokens are set aside)" if aside else ""
        state.warn_once(f"grid-{index}", f"tomesd: transformer block {index} has {N} tokens, which is no level "
                        f"of the {ctx.grid_h}×{ctx.grid_w} token grid of the latent (halving each side, rounding "
                        f"up){after}; it is not merged")
        return None
    downsample, h, w = level
    if downsample > state.max_downsample:
        return None
    cfg = state.config
    dst = (h // cfg.sy) * (w // cfg.sx)
    if dst == 0:  # at the model's finest level no coarser one has a dst either: nothing merges, a warning
        finest = downsample <= state.host.top_level
        log_once(state, f"narrow-{downsample}-{h}x{w}", f"tomesd: the /{downsample} level's {h}×{w} token grid "
                 f"is narrower than one sy×sx = {cfg.sy}×{cfg.sx} dst cell, so it has no dst tokens; it is not "
                 "merged" + ("; no level has one, so nothing is merged in such calls (use smaller sx / sy)"
                             if finest else ""), logging.WARNING if finest else logging.INFO)
        return None
    ratio = _ratio(state, ctx, downsample)
    r = min(int(n * ratio), n - dst)
    if r <= 0:
        if ratio > 0:
            state.warn_once(f"r0-{downsample}-{n}", f"tomesd: ratio {ratio:g} merges int({n} × {ratio:g}) = 0 of the "
                            f"{n} tokens of the /{downsample} level ({h}×{w}); nothing is merged there (a ratio of at "
                            f"least {1 / n:.3g} merges one token)")
        return None
    key = ctx.key
    if key is not None and B % 2 == 1:
        log_once(state, "odd-batch", f"tomesd: batch of odd size {B}: random dst selection is off for it "
                 "(as in ToMe for SD: the conditional and unconditional halves must share a partition)", logging.INFO)
        key = None
    if key is not None:
        key = keys.block_key(key, index)
    return MergeRequest(metric=x, h=h, w=w, r=r, key=key, downsample=downsample, head=ctx.head, tail=ctx.tail)


def exit_block(state: ModelState) -> None:
    frames = state.frames
    ctx = frames[-1] if frames else None
    block = ctx.block if ctx is not None else None
    if block is not None:
        ctx.block = None
        if block.pushed:
            frames.pop()


def plan_of(state: ModelState, block: BlockCall) -> Optional[MergePlan]:
    """The block's MergePlan for this call, provided on first use."""
    if block.plan is None and block.request is not None:
        request, block.request = block.request, None
        ctx = state.current()
        block.plan = state.plans.provide(ctx, block.index, request)
        if ctx.records is not None and block.index in ctx.records:
            ctx.records[block.index].plan = block.plan
        for observe in state.observers:
            observe(block.index, block.plan, request)
    return block.plan


def on_block_call(state: ModelState, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    x, _ = get_arg(args, kwargs, state.host.input_names, 0)
    enter_block(state, index, x, partial(state.host.call_refusal, module, args, kwargs))


def on_block_done(state: ModelState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    exit_block(state)


def block_entry(state: ModelState, index: int, original, args: tuple, kwargs: dict):
    """enter_block → the block's method → exit_block (the entry of blocks that checkpoint `_forward`)."""
    x, _ = get_arg(args, kwargs, state.host.input_names, 0)
    enter_block(state, index, x, partial(state.host.call_refusal, state.host.blocks[index], args, kwargs))
    try:
        return original(*args, **kwargs)
    finally:
        exit_block(state)
