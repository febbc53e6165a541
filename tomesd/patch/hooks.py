"""Host-independent attachment: typed state and the forward hooks that merge and unmerge.

Per patched model:
- a pre-hook on the denoiser (root) records the latent size and the timestep of each call;
- a pre-hook on each transformer block reads its `hidden_states` (the metric) and resolves the level,
  ratio and random key; the block's MergePlan is built when its first merged sub-layer runs (a block
  whose forward is skipped, e.g. by a diffusers cache hook, costs nothing); a post-hook drops it;
- pre/post hooks on attn1 (and attn2 / ff when asked) merge the sub-layer's input and unmerge its
  output. No host forward is copied; removing the hooks restores the model exactly.

Gradient checkpointing recomputes a block in backward, after the root call has returned. Each root
call made with gradients enabled therefore stays registered, with a fingerprint of every block input
it planned, while its latent or its output tensor is alive (and the latest such call always), and a
block called outside a root call with gradients enabled looks its call up there: the recompute gets
the same level, ratio and random key, hence the same partition and the same plan.
"""
from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..config import ToMeConfig
from ..matching import MergePlan, mix32, partition

logger = logging.getLogger("tomesd")

_MASK32 = 0xFFFFFFFF
STATE_ATTR = "_tomesd"
# Root calls kept for checkpoint recomputes at most (oldest dropped first); each holds a few ints.
MAX_LIVE_CALLS = 16


@dataclass(frozen=True)
class Host:
    """What patching needs to know about one kind of model.

    root: the denoiser whose forward takes the latent [B, C, H, W] (or [B, C, F, H, W] /
    [B, F, C, H, W]; H, W are always the last two dims) as its sample argument.
    blocks: its transformer blocks to patch, in module order. top_level: downsample factor of its
    highest-resolution transformer level, in tokens of the patch grid. patch_size: the token grid
    at level 1 is (H // patch_size) × (W // patch_size) (DiT, PixArt: the patch embedding's size).
    sublayers: (attn1, attn2, ff) attribute names. excluded: blocks found but deliberately not
    patched, with the reason (logged once when patching). sublayer_refusal(sub) → why merging
    before `sub` would be wrong (e.g. it carries a hook replaying cached outputs), or None.
    """

    name: str
    root: nn.Module
    blocks: Sequence[nn.Module]
    top_level: int
    vae_scale_factor: int = 8
    patch_size: int = 1
    sample_names: Tuple[str, ...] = ("sample", "x", "hidden_states")
    timestep_names: Tuple[str, ...] = ("timestep", "timesteps", "t")
    input_names: Tuple[str, ...] = ("hidden_states", "x")
    mask_names: Tuple[str, ...] = ("attention_mask", "mask")
    sublayers: Tuple[str, str, str] = ("attn1", "attn2", "ff")
    excluded: Tuple[Tuple[nn.Module, str], ...] = ()
    sublayer_refusal: Optional[Callable[[nn.Module], Optional[str]]] = None


@dataclass
class CallContext:
    """One denoiser call: latent size, random key and the ratios resolved so far per level.

    height, width: the latent's size; grid_h, grid_w: its token grid at level 1 (latent / patch size).
    inputs: block index → fingerprint of the input it planned (only for calls with gradients).
    """

    height: int
    width: int
    grid_h: int
    grid_w: int
    key: Optional[Tensor]
    ratios: Dict[int, float] = field(default_factory=dict)
    inputs: Dict[int, tuple] = field(default_factory=dict)
    anchors: int = 0


@dataclass
class Pending:
    """A block call's merge, resolved but not yet planned: the metric [B, N, C] on an h × w grid."""

    metric: Tensor
    h: int
    w: int
    r: int
    key: Optional[Tensor]


@dataclass
class BlockState:
    """One patched block: its plan for the current call and the sub-layers merged right now.

    merged: sub-layer name → the plan its input was merged with (its rows, for a batch chunk).
    rows_done: batch rows of `ff` already run in this call (feed-forward chunked over the batch).
    """

    index: int
    pending: Optional[Pending] = None
    plan: Optional[MergePlan] = None
    merged: Dict[str, MergePlan] = field(default_factory=dict)
    rows_done: int = 0


@dataclass
class ModelState:
    config: ToMeConfig
    host: Host
    max_downsample: int
    base_key: int
    sample_pos: Optional[int] = 0
    timestep_pos: Optional[int] = 1
    handles: List[Any] = field(default_factory=list)
    blocks: List[BlockState] = field(default_factory=list)
    ctx: Optional[CallContext] = None
    running: bool = False
    live: List[CallContext] = field(default_factory=list)
    warned: set = field(default_factory=set)


def _warn_once(state: ModelState, tag: str, message: str) -> None:
    _log_once(state, tag, message, logging.WARNING)


@torch.compiler.disable
def _log_once(state: ModelState, tag: str, message: str, level: int) -> None:
    if tag not in state.warned:
        state.warned.add(tag)
        logger.log(level, message)


def _get_arg(args: tuple, kwargs: dict, names: Sequence[str], position: Optional[int]):
    """The argument at `position` or passed by one of `names`, or None (and where it was found)."""
    if position is not None and len(args) > position:
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


def arg_position(module: nn.Module, names: Sequence[str], default: Optional[int]) -> Optional[int]:
    """Position of the first of `names` among the positional parameters of type(module).forward.

    The class's forward is read (not the instance attribute, which offloading / cache hooks may
    replace by a (*args, **kwargs) wrapper). None if the forward names none of them positionally;
    `default` if its signature cannot be read.
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return default
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and any(p.kind is p.VAR_POSITIONAL for p in params):
        return default
    for name in names:
        if name in positional:
            return positional.index(name)
    return None


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
    state.running = True
    state.ctx = None
    sample, _ = _get_arg(args, kwargs, host.sample_names, state.sample_pos)
    if not isinstance(sample, Tensor) or sample.ndim not in (4, 5):
        _warn_once(state, "root-input", f"tomesd: {type(module).__name__} was called without a latent "
                   f"[B, C, H, W] or [B, C, F, H, W] as its sample argument ({' / '.join(host.sample_names)}); "
                   "token merging is off for such calls")
        return
    key = None
    if state.config.use_rand:
        timestep, _ = _get_arg(args, kwargs, host.timestep_names, state.timestep_pos)
        key = step_key(state.base_key, timestep, sample.device)
    H, W = sample.shape[-2], sample.shape[-1]
    p = host.patch_size
    state.ctx = CallContext(height=H, width=W, grid_h=H // p, grid_w=W // p, key=key)
    if torch.is_grad_enabled():
        _keep_for_backward(state, state.ctx, sample)


def on_root_done(state: ModelState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    ctx, state.ctx, state.running = state.ctx, None, False
    if ctx is not None and ctx.anchors:
        _anchor(state, ctx, _first_tensor(output))


@torch.compiler.disable
def _keep_for_backward(state: ModelState, ctx: CallContext, sample: Tensor) -> None:
    """Register a call with gradients for checkpoint recomputes, anchored to its latent's lifetime."""
    state.live[:] = [c for c in state.live if c.anchors > 0][-(MAX_LIVE_CALLS - 1) :]
    state.live.append(ctx)
    _anchor(state, ctx, sample)


@torch.compiler.disable
def _anchor(state: ModelState, ctx: CallContext, tensor: Optional[Tensor]) -> None:
    if tensor is not None:
        ctx.anchors += 1
        weakref.finalize(tensor, _anchor_freed, state, ctx)


def _anchor_freed(state: ModelState, ctx: CallContext) -> None:
    """A call's latent or output was freed; once both are, no backward can need it (unless latest)."""
    ctx.anchors -= 1
    if ctx.anchors == 0 and state.live and state.live[-1] is not ctx:
        state.live[:] = [c for c in state.live if c is not ctx]


def _first_tensor(output) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        values = output
    elif isinstance(output, dict):
        values = list(output.values())
    else:
        values = list(getattr(output, "__dict__", {}).values())
    return next((v for v in values if isinstance(v, Tensor)), None)


@torch.compiler.disable
def _fingerprint(x: Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.device, x.data_ptr(), x._version)


@torch.compiler.disable
def _recompute_context(state: ModelState, block: BlockState, x: Tensor) -> Optional[CallContext]:
    """The context a block call outside any root call (a checkpoint recompute) was planned with.

    Calls whose planned input has x's shape, dtype and device are candidates; several are told
    apart by the input's storage and version (exact when the checkpoint wraps the block itself).
    RuntimeError if they cannot be, rather than recomputing with another call's partition.
    """
    fp = _fingerprint(x)
    found = [c for c in state.live if c.inputs.get(block.index, (None,) * 5)[:3] == fp[:3]]
    if len(found) > 1:
        found = [c for c in found if c.inputs[block.index] == fp] or found
    if len(found) > 1 and not all(_same_merge(found[0], c) for c in found[1:]):
        raise RuntimeError(
            f"tomesd: transformer block {block.index} is being recomputed (gradient checkpointing) but "
            f"{len(found)} forward calls with gradients are still alive and their inputs cannot be told "
            "apart, so the partition of the original forward is unknown. Run backward (and drop the "
            "output) before the next forward with gradients, checkpoint whole transformer blocks, or "
            "patch with use_rand=False."
        )
    return found[-1] if found else None


def _same_merge(a: CallContext, b: CallContext) -> bool:
    return a.key is None and b.key is None and (a.grid_h, a.grid_w, a.ratios) == (b.grid_h, b.grid_w, b.ratios)


def _ratio(state: ModelState, ctx: CallContext, downsample: int) -> float:
    schedule = state.config.schedule
    level = downsample if schedule.fn_takes_level else 0
    if level not in ctx.ratios:
        scale = state.host.vae_scale_factor
        ctx.ratios[level] = schedule.resolve(ctx.height * scale, ctx.width * scale, downsample)
    return ctx.ratios[level]


def on_block_call(state: ModelState, block: BlockState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    block.pending = block.plan = None
    block.rows_done = 0
    x, _ = _get_arg(args, kwargs, state.host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3:
        _warn_once(state, f"block-input-{block.index}", f"tomesd: transformer block {block.index} was called "
                   "without [B, N, C] tokens as hidden_states; it is not merged")
        return
    ctx = state.ctx
    if ctx is None:
        if state.running:
            return  # the root call's latent was not found (warned there)
        ctx = _recompute_context(state, block, x) if torch.is_grad_enabled() and state.live else None
        if ctx is None:
            _warn_once(state, f"no-root-{block.index}", f"tomesd: transformer block {block.index} was called "
                       f"outside a call of {type(state.host.root).__name__}, so its token grid is unknown; "
                       "it is not merged in such calls")
            return
    elif ctx.anchors:
        ctx.inputs[block.index] = _fingerprint(x)
    B, N, _ = x.shape
    tokens = ctx.grid_h * ctx.grid_w
    if N == 0 or N > tokens:
        _warn_once(state, f"grid-{block.index}", f"tomesd: transformer block {block.index} has {N} tokens, more "
                   f"than the {ctx.grid_h}×{ctx.grid_w} token grid of the latent; it is not merged")
        return
    downsample = int(math.ceil(math.sqrt(tokens // N)))
    h, w = -(-ctx.grid_h // downsample), -(-ctx.grid_w // downsample)
    if h * w != N:
        _warn_once(state, f"grid-{block.index}", f"tomesd: transformer block {block.index} has {N} tokens, which "
                   f"is not the {h}×{w} grid of a {ctx.grid_h}×{ctx.grid_w} token grid at /{downsample}; "
                   "it is not merged")
        return
    if downsample > state.max_downsample:
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
    block.pending = Pending(metric=x, h=h, w=w, r=r, key=key)


def _plan(state: ModelState, block: BlockState) -> Optional[MergePlan]:
    """The block's MergePlan for this call, built on first use."""
    if block.plan is None and block.pending is not None:
        p, block.pending = block.pending, None
        dst_idx, src_idx = partition(p.h, p.w, state.config.sx, state.config.sy, p.key, p.metric.device)
        block.plan = ops.build_plan(p.metric, dst_idx, src_idx, p.r)
    return block.plan


def on_block_done(block: BlockState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    block.pending = block.plan = None
    block.merged.clear()


def _rows(plan: MergePlan, start: int, stop: int) -> MergePlan:
    return MergePlan(slot=plan.slot[start:stop], counts=plan.counts[start:stop], num_out=plan.num_out)


def on_sublayer_call(state: ModelState, block: BlockState, name: str, module: nn.Module, args: tuple, kwargs: dict):
    if block.pending is None and block.plan is None:
        return None
    host = state.host
    if host.sublayer_refusal is not None:
        why = host.sublayer_refusal(module)
        if why is not None:
            _warn_once(state, f"refused-{name}-{why}", f"tomesd: {name} is not merged in blocks where {why}")
            return None
    if name == host.sublayers[0] and any(kwargs.get(m) is not None for m in host.mask_names):
        _warn_once(state, "mask", "tomesd: a self-attention mask was passed to attn1; blocks called with one "
                   "are not merged (the mask is over unmerged tokens)")
        block.pending = block.plan = None
        return None
    plan = _plan(state, block)
    x, where = _get_arg(args, kwargs, host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3:
        _warn_once(state, f"shape-{name}", f"tomesd: {name} was called without [B, N, C] tokens; it is not merged")
        return None
    B, N = plan.slot.shape
    if x.shape[1] != N:
        _warn_once(state, f"chunk-{name}", f"tomesd: {name} was called on {x.shape[1]} of a block's {N} tokens "
                   "(feed-forward chunking over the token axis, dim=1); a chunk cannot be merged on its own, so "
                   f"{name} runs unmerged, chunk by chunk, in such blocks. Chunk over the batch (dim=0) to merge it")
        return None
    if x.shape[0] == B:
        used = plan
    elif name == host.sublayers[2] and block.rows_done + x.shape[0] <= B:
        # feed-forward chunking over the batch: this call holds the next rows of the block's batch
        used = _rows(plan, block.rows_done, block.rows_done + x.shape[0])
        block.rows_done += x.shape[0]
    else:
        _warn_once(state, f"shape-{name}", f"tomesd: {name} was called with a batch of {x.shape[0]} rows, not the "
                   f"block's {B}; it is not merged there")
        return None
    block.merged[name] = used
    return _set_arg(args, kwargs, where, ops.merge(x, used))


def on_sublayer_done(block: BlockState, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
    plan = block.merged.pop(name, None)
    if plan is None:
        return None
    return ops.unmerge(output, plan)


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
        sample_pos=arg_position(host.root, host.sample_names, 0),
        timestep_pos=arg_position(host.root, host.timestep_names, 1),
    )
    reasons: Dict[str, int] = {}
    for _, reason in host.excluded:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        logger.info("tomesd: %d transformer block(s) of %s are not patched: %s", count, type(host.root).__name__, reason)
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
    state.live.clear()
    delattr(root, STATE_ATTR)
