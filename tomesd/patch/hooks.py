"""Host-independent attachment: typed state and the forward hooks that merge and unmerge.

Per patched model:
- a pre-hook on the denoiser (root) records the latent size and the timestep of each call;
- a pre-hook on each transformer block reads its `hidden_states` (the metric), resolves the ratio for
  its level and builds the block's MergePlan; a post-hook drops it;
- pre/post hooks on attn1 (and attn2 / ff when asked) merge the sub-layer's input and unmerge its
  output. No host forward is copied; removing the hooks restores the model exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..config import ToMeConfig
from ..matching import MergePlan, mix32, partition

logger = logging.getLogger("tomesd")

_MASK32 = 0xFFFFFFFF
STATE_ATTR = "_tomesd"


@dataclass(frozen=True)
class Host:
    """What patching needs to know about one kind of model.

    root: the denoiser whose forward takes the latent [B, C, H, W] (or [B, C, F, H, W]) first.
    blocks: its transformer blocks, in module order. top_level: downsample factor of its
    highest-resolution transformer level. sublayers: (attn1, attn2, ff) attribute names.
    """

    name: str
    root: nn.Module
    blocks: Sequence[nn.Module]
    top_level: int
    vae_scale_factor: int = 8
    sample_names: Tuple[str, ...] = ("sample", "x", "hidden_states")
    timestep_names: Tuple[str, ...] = ("timestep", "timesteps", "t")
    input_names: Tuple[str, ...] = ("hidden_states", "x")
    mask_names: Tuple[str, ...] = ("attention_mask", "mask")
    sublayers: Tuple[str, str, str] = ("attn1", "attn2", "ff")


@dataclass
class CallContext:
    """One denoiser call: latent size, random key and the ratios resolved so far per level."""

    height: int
    width: int
    key: Optional[Tensor]
    ratios: Dict[int, float] = field(default_factory=dict)


@dataclass
class BlockState:
    index: int
    plan: Optional[MergePlan] = None
    merged: Dict[str, bool] = field(default_factory=dict)


@dataclass
class ModelState:
    config: ToMeConfig
    host: Host
    max_downsample: int
    base_key: int
    handles: List[Any] = field(default_factory=list)
    blocks: List[BlockState] = field(default_factory=list)
    ctx: Optional[CallContext] = None
    warned: set = field(default_factory=set)


def _warn_once(state: ModelState, tag: str, message: str) -> None:
    _log_once(state, tag, message, logging.WARNING)


@torch.compiler.disable
def _log_once(state: ModelState, tag: str, message: str, level: int) -> None:
    if tag not in state.warned:
        state.warned.add(tag)
        logger.log(level, message)


def _get_arg(args: tuple, kwargs: dict, names: Sequence[str], position: int):
    """The argument at `position` or passed by one of `names`, or None (and where it was found)."""
    if len(args) > position:
        return args[position], position
    for name in names:
        if name in kwargs:
            return kwargs[name], name
    return None, None


def _set_arg(args: tuple, kwargs: dict, where, value) -> Tuple[tuple, dict]:
    if isinstance(where, int):
        args = args[:where] + (value,) + args[where + 1 :]
    else:
        kwargs = dict(kwargs)
        kwargs[where] = value
    return args, kwargs


def base_key(seed: Optional[int]) -> int:
    """32-bit key of the user's seed; with no seed, one drawn from torch's default CPU generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return mix32((seed & _MASK32) ^ mix32((seed >> 32) & _MASK32))


def step_key(base: int, timestep, device) -> Tensor:
    """int64 scalar on `device`: a hash of the base key and the timestep's bits (no host sync)."""
    if timestep is None:
        bits = torch.zeros((), dtype=torch.int64, device=device)
    else:
        t = torch.as_tensor(timestep, device=device).reshape(-1)[0]
        bits = t.to(torch.float32).view(torch.int32).to(torch.int64) & _MASK32
    return mix32(bits ^ base)


def on_root_call(state: ModelState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    host = state.host
    sample, _ = _get_arg(args, kwargs, host.sample_names, 0)
    if not isinstance(sample, Tensor) or sample.ndim not in (4, 5):
        state.ctx = None
        _warn_once(state, "root-input", f"tomesd: {type(module).__name__} was called without a [B, C, H, W] latent "
                   "as its first argument; token merging is off for such calls")
        return
    key = None
    if state.config.use_rand:
        timestep, _ = _get_arg(args, kwargs, host.timestep_names, 1)
        key = step_key(state.base_key, timestep, sample.device)
    state.ctx = CallContext(height=sample.shape[-2], width=sample.shape[-1], key=key)


def on_root_done(state: ModelState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    state.ctx = None


def _ratio(state: ModelState, ctx: CallContext, downsample: int) -> float:
    schedule = state.config.schedule
    level = downsample if schedule.fn_takes_level else 0
    if level not in ctx.ratios:
        scale = state.host.vae_scale_factor
        ctx.ratios[level] = schedule.resolve(ctx.height * scale, ctx.width * scale, downsample)
    return ctx.ratios[level]


def on_block_call(state: ModelState, block: BlockState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    block.plan = None
    ctx = state.ctx
    if ctx is None:
        return
    x, _ = _get_arg(args, kwargs, state.host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3:
        return
    B, N, _ = x.shape
    tokens = ctx.height * ctx.width
    if N == 0 or N > tokens:
        return
    downsample = int(math.ceil(math.sqrt(tokens // N)))
    if downsample > state.max_downsample:
        return
    h, w = -(-ctx.height // downsample), -(-ctx.width // downsample)
    if h * w != N:
        _warn_once(state, f"grid-{block.index}", f"tomesd: block {block.index} has {N} tokens, which is not the "
                   f"{h}×{w} grid of a {ctx.height}×{ctx.width} latent at /{downsample}; it is not merged")
        return
    cfg = state.config
    num_src = N - (h // cfg.sy) * (w // cfg.sx)
    r = min(int(N * _ratio(state, ctx, downsample)), num_src)
    if r <= 0:
        return
    key = ctx.key
    if key is not None and B % 2 == 1:
        _log_once(state, "odd-batch", f"tomesd: batch of odd size {B}: random dst selection is off for it "
                  "(as in ToMe for SD: the conditional and unconditional halves must share a partition)",
                  logging.INFO)
        key = None
    if key is not None:
        key = mix32((key + block.index * 0x632BE5AB) & _MASK32)
    dst_idx, src_idx = partition(h, w, cfg.sx, cfg.sy, key, x.device)
    block.plan = ops.build_plan(x, dst_idx, src_idx, r)


def on_block_done(block: BlockState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    block.plan = None
    block.merged.clear()


def on_sublayer_call(state: ModelState, block: BlockState, name: str, module: nn.Module, args: tuple, kwargs: dict):
    plan = block.plan
    if plan is None:
        return None
    x, where = _get_arg(args, kwargs, state.host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[1] != plan.num_in or x.shape[0] != plan.slot.shape[0]:
        _warn_once(state, f"shape-{name}", f"tomesd: {name} was called with a tensor that is not the block's "
                   f"[B, N, C] tokens; it is not merged there")
        return None
    if name == state.host.sublayers[0]:
        if any(kwargs.get(m) is not None for m in state.host.mask_names):
            _warn_once(state, "mask", "tomesd: a self-attention mask was passed to attn1; blocks called with one "
                       "are not merged (the mask is over unmerged tokens)")
            block.plan = None
            return None
    block.merged[name] = True
    return _set_arg(args, kwargs, where, ops.merge(x, plan))


def on_sublayer_done(block: BlockState, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
    if not block.merged.pop(name, False):
        return None
    return ops.unmerge(output, block.plan)


def top_level(stages: Sequence[nn.Module], blocks: Sequence[nn.Module], downsamples) -> int:
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


def attach(host: Host, config: ToMeConfig) -> ModelState:
    """Register every hook on host's modules; the returned state owns their handles."""
    state = ModelState(
        config=config,
        host=host,
        max_downsample=config.max_downsample or host.top_level,
        base_key=base_key(config.seed) if config.use_rand else 0,
    )
    add = state.handles.append
    add(host.root.register_forward_pre_hook(partial(on_root_call, state), with_kwargs=True))
    add(host.root.register_forward_hook(partial(on_root_done, state), with_kwargs=True, always_call=True))
    wanted = (config.merge_attn, config.merge_crossattn, config.merge_mlp)
    names = [name for name, on in zip(host.sublayers, wanted) if on]
    for index, module in enumerate(host.blocks):
        block = BlockState(index)
        state.blocks.append(block)
        add(module.register_forward_pre_hook(partial(on_block_call, state, block), with_kwargs=True))
        add(module.register_forward_hook(partial(on_block_done, block), with_kwargs=True, always_call=True))
        for name in names:
            sub = getattr(module, name, None)
            if isinstance(sub, nn.Module):
                add(sub.register_forward_pre_hook(partial(on_sublayer_call, state, block, name), with_kwargs=True))
                add(sub.register_forward_hook(partial(on_sublayer_done, block, name), with_kwargs=True))
    setattr(host.root, STATE_ATTR, state)
    return state


def detach(root: nn.Module) -> None:
    """Remove every hook `attach` put on root's model; a no-op if it is not patched."""
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    state.handles.clear()
    delattr(root, STATE_ATTR)
