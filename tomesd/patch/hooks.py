"""Host-independent attachment: typed state and the forward hooks that merge and unmerge.

Per patched model (its ModelState holds only the configuration and the hook handles):
- a pre-hook on the denoiser (root) opens a CallContext for the call — latent size, random key, the
  ratios and plans resolved during it — on a stack local to the calling thread, and a post-hook
  closes it. Two threads calling one model each see only their own call; a call interrupted half-way
  (Ctrl-C) leaves nothing that the next call uses, because every root call starts a fresh stack;
- each transformer block's entry (a forward pre-hook, or for LDM blocks that checkpoint their
  `_forward` a wrapper of that method — see `Host.entry`) reads its `hidden_states` (the metric) and
  resolves the level, ratio and random key; the block's MergePlan is built when its first merged
  sub-layer runs (a block whose forward is skipped, e.g. by a diffusers cache hook, costs nothing);
- pre/post hooks on attn1 (and attn2 / ff when asked) merge the sub-layer's input and unmerge its
  output. No host forward is copied; removing the hooks restores the model exactly.

Gradient checkpointing recomputes a block in backward, after the root call has returned. A call made
with gradients records, per merged block, what its input was (a weak reference, its memory and a small
probe of its values), and the call's context stays findable exactly as long as the autograd graph of
its output is alive (the graph node holds it; the model keeps only weak references). A block entered
outside any root call with gradients enabled finds its call there — by the very input tensor when the
checkpoint saved it, else by the probe — and recomputes with that call's level, ratio and random key,
hence the same partition and plan. When that cannot be decided, it raises instead of guessing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import ops
from ..config import ToMeConfig
from ..matching import MergePlan, mix32, partition

logger = logging.getLogger("tomesd")

_MASK32 = 0xFFFFFFFF
STATE_ATTR = "_tomesd"
# Key under which a call's context rides on its output's autograd node (Node.metadata).
GRAPH_KEY = "tomesd_calls"
# A recompute's input matches a recorded probe when max |Δ| ≤ PROBE_RTOL · max |probe| (+ PROBE_ATOL):
# loose enough for non-deterministic kernels in the recompute, far below what separates two calls.
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-6
# Blocks patched by some model's state (one patch per block).
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, ModelState]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Sublayer:
    """A sub-layer of a transformer block that can run on merged tokens.

    name: its attribute on the block. kind: "self" — attention among the image tokens (self- or joint
    attention): the mode (tokens / kv) applies there and prop_attn biases it; "cross" — attention from
    the image tokens to the text; "mlp" — the feed-forward. merge_attn / merge_crossattn / merge_mlp
    choose the kinds.
    """

    name: str
    kind: str


KIND_FLAGS = {"self": "merge_attn", "cross": "merge_crossattn", "mlp": "merge_mlp"}
UNET_SUBLAYERS = (Sublayer("attn1", "self"), Sublayer("attn2", "cross"), Sublayer("ff", "mlp"))


@dataclass(frozen=True)
class Host:
    """What patching needs to know about one kind of model.

    root: the denoiser whose forward takes the latent [B, C, H, W] (or [B, C, F, H, W] /
    [B, F, C, H, W]; H, W are always the last two dims) as its sample argument.
    blocks: its transformer blocks to patch, in module order. top_level: downsample factor of its
    highest-resolution transformer level, in tokens of the patch grid. patch_size: the token grid
    at level 1 is (H // patch_size) × (W // patch_size) (DiT, PixArt: the patch embedding's size).
    sublayers: the blocks' Sublayers. excluded: blocks found but deliberately not
    patched, with the reason (logged once when patching). sublayer_refusal(sub) → why merging
    before `sub` would be wrong (e.g. it carries a hook replaying cached outputs), or None.
    entry(block) → the name of a block method to wrap as the block's entry instead of forward hooks,
    or None: LDM blocks run `checkpoint(self._forward, ...)`, whose recompute calls `_forward` directly
    and never passes the module's hooks. kv_name: attn1's argument holding the key/value source
    (kv mode passes the merged tokens there); bias_name: attn1's argument for an additive float bias on
    the attention logits [B, 1, M] (prop_attn), None if the host's attention takes none.
    kv_refusal(attn1) → why keys/values cannot come from a separate input there, or None.
    joint: where the image tokens sit in the sequence a joint attention (MMDiT: image and text tokens
    attend together) hands to F.scaled_dot_product_attention, "first" or "last"; kv mode and prop_attn
    then act on that call's image keys/values (after any rotary embedding). None: attention taking a
    key/value source and a bias as arguments (kv_name, bias_name).
    tokens_refusal: why mode="tokens" cannot run in "self" sub-layers (e.g. per-token rotary
    positions), or None. locate(args, kwargs) → (H, W) of the latent (token grid × patch_size) for a
    root whose sample is not a [B, C, H, W] latent (Flux: packed tokens and their position ids).
    default_mode: the mode of `apply_patch(..., mode=None)`.
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
    sublayers: Tuple[Sublayer, ...] = UNET_SUBLAYERS
    excluded: Tuple[Tuple[nn.Module, str], ...] = ()
    sublayer_refusal: Optional[Callable[[nn.Module], Optional[str]]] = None
    entry: Optional[Callable[[nn.Module], Optional[str]]] = None
    kv_name: str = "encoder_hidden_states"
    bias_name: Optional[str] = "attention_mask"
    kv_refusal: Optional[Callable[[nn.Module], Optional[str]]] = None
    joint: Optional[str] = None
    tokens_refusal: Optional[str] = None
    locate: Optional[Callable[[tuple, dict], Optional[Tuple[int, int]]]] = None
    default_mode: str = "tokens"


@dataclass
class Pending:
    """A block call's merge, resolved but not yet planned: the metric [B, N, C] on the h × w grid of
    level /downsample."""

    metric: Tensor
    h: int
    w: int
    r: int
    key: Optional[Tensor]
    downsample: int = 1


@dataclass
class BlockCall:
    """One block's merge within one denoiser call.

    merged: sub-layer name → the plan its input was merged with (its rows, for a batch chunk).
    joint: sub-layer name → what its attention call must do to the image keys (Joint, for joint hosts).
    rows_done: batch rows of `ff` already run in this call (feed-forward chunked over the batch).
    pushed: the block's entry opened a recompute context, which its exit closes.
    """

    pending: Optional[Pending] = None
    plan: Optional[MergePlan] = None
    merged: Dict[str, MergePlan] = field(default_factory=dict)
    joint: Dict[str, "Joint"] = field(default_factory=dict)
    rows_done: int = 0
    pushed: bool = False


@dataclass
class Record:
    """What a merged block's input was in a call with gradients, to find the call in a recompute.

    ref: weak reference to the input; memory: (shape, stride, dtype, device, data_ptr, version);
    probe: a strided sample of its values [B, ≤8, ≤8] fp32; plan: the plan the block merged with (a
    recompute replays it, whether it was built, shared or reused in the forward).
    """

    ref: "weakref.ref[Tensor]"
    memory: tuple
    probe: Tensor
    plan: Optional[MergePlan] = None


@dataclass
class CallContext:
    """One denoiser call: latent size, random key, and what was resolved during it.

    height, width: the latent's size; grid_h, grid_w: its token grid at level 1 (latent / patch size).
    timestep: the call's timestep tensor (or number), if any; number: the call's index on its thread.
    levels: token count → (downsample, h, w) of the level with that many tokens (None: no level).
    blocks: block index → its BlockCall while the block runs. records: block index → Record, for
    calls made with gradients (None otherwise). recompute: this is a copy opened by a checkpoint
    recompute of one block. shared: level → the plan its blocks share in this call (share_plan).
    """

    height: int
    width: int
    grid_h: int
    grid_w: int
    key: Optional[Tensor]
    timestep: Any = None
    number: int = 0
    levels: Dict[int, Optional[Tuple[int, int, int]]] = field(default_factory=dict)
    ratios: Dict[int, float] = field(default_factory=dict)
    blocks: Dict[int, BlockCall] = field(default_factory=dict)
    records: Optional[Dict[int, Record]] = None
    recompute: bool = False
    shared: Dict[int, MergePlan] = field(default_factory=dict)


@dataclass
class ModelState:
    """One patched model: configuration and hook handles. Per-call state lives in CallContexts.

    local: per thread, `frames`, the stack of open CallContexts (None for a root call that merges
    nothing), `calls`, how many root calls it made, and `reused`, the plans kept for plan_every.
    live: calls with gradients whose autograd graph is alive (weak; the graph holds them).
    modes: sub-layer name → the Mode merging there; kinds: sub-layer name → its Sublayer kind.
    """

    config: ToMeConfig
    host: Host
    max_downsample: int
    base_key: int
    sample_pos: Optional[int] = 0
    timestep_pos: Optional[int] = 1
    handles: List[Any] = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)
    live: "weakref.WeakValueDictionary[int, CallContext]" = field(default_factory=weakref.WeakValueDictionary)
    ids: Any = field(default_factory=itertools.count)
    lock: Any = field(default_factory=threading.Lock)
    warned: set = field(default_factory=set)
    active: bool = True
    modes: Dict[str, "Mode"] = field(default_factory=dict)
    kinds: Dict[str, str] = field(default_factory=dict)


def _warn_once(state: ModelState, tag: str, message: str) -> None:
    _log_once(state, tag, message, logging.WARNING)


@torch.compiler.disable
def _log_once(state: ModelState, tag: str, message: str, level: int) -> None:
    if tag not in state.warned:
        state.warned.add(tag)
        logger.log(level, message)


def unwrap_compiled(module):
    """The module a `torch.compile(module)` wrapper (OptimizedModule) holds; anything else unchanged."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(module, nn.Module) and isinstance(inner, nn.Module) else module


def is_compiled(module) -> bool:
    """True if module is a torch.compile wrapper or it, or a module inside it, was compiled in place
    (`module.compile()`): compiled code does not see hooks added or removed after it was traced."""
    if not isinstance(module, nn.Module):
        return False
    if unwrap_compiled(module) is not module:
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _frames(state: ModelState) -> list:
    """This thread's stack of open calls of the model."""
    frames = getattr(state.local, "frames", None)
    if frames is None:
        frames = state.local.frames = []
    return frames


def _block_call(state: ModelState, index: int) -> Optional[BlockCall]:
    frames = _frames(state)
    ctx = frames[-1] if frames else None
    return None if ctx is None else ctx.blocks.get(index)


def current_plan(state: ModelState, index: int) -> Optional[MergePlan]:
    """The plan block `index` merges with in this thread's current call (None if not built)."""
    block = _block_call(state, index)
    return None if block is None else block.plan


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
    """32-bit key of the user's seed.

    With no seed, a hash of torch's default CPU generator state, which is read, not advanced: patching
    leaves the user's random numbers alone, and `torch.manual_seed(s)` before patching reproduces.
    """
    if seed is None:
        digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") >> 2
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
    frames = _frames(state)
    frames.clear()  # a root call never nests in itself: anything open is left by an interrupted call
    sample, _ = _get_arg(args, kwargs, host.sample_names, state.sample_pos)
    size = host.locate(args, kwargs) if host.locate is not None and isinstance(sample, Tensor) else None
    if size is None and isinstance(sample, Tensor) and sample.ndim in (4, 5):
        size = sample.shape[-2], sample.shape[-1]
    if size is None:
        _warn_once(state, "root-input", f"tomesd: {type(module).__name__} was called without a latent "
                   f"[B, C, H, W] or [B, C, F, H, W] as its sample argument ({' / '.join(host.sample_names)}); "
                   "token merging is off for such calls")
        frames.append(None)
        return
    timestep, _ = _get_arg(args, kwargs, host.timestep_names, state.timestep_pos)
    key = step_key(state.base_key, timestep, sample.device) if state.config.use_rand else None
    H, W = size
    p = host.patch_size
    records = {} if torch.is_grad_enabled() else None
    number = state.local.calls = getattr(state.local, "calls", -1) + 1
    frames.append(CallContext(height=H, width=W, grid_h=H // p, grid_w=W // p, key=key, timestep=timestep,
                              number=number, records=records))


def on_root_done(state: ModelState, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    frames = _frames(state)
    ctx = frames.pop() if frames else None
    if ctx is not None and ctx.records:
        _keep_for_backward(state, ctx, _first_tensor(output))


@torch.compiler.disable
def _keep_for_backward(state: ModelState, ctx: CallContext, output: Optional[Tensor]) -> None:
    """Keep a call with gradients findable by checkpoint recomputes while its output's graph lives."""
    node = getattr(output, "grad_fn", None)
    if node is None:
        return  # nothing can backpropagate into this call
    node.metadata.setdefault(GRAPH_KEY, []).append(ctx)
    with state.lock:
        state.live[next(state.ids)] = ctx


def _live_calls(state: ModelState) -> List[CallContext]:
    with state.lock:
        return list(state.live.values())


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


def _memory(x: Tensor) -> tuple:
    return (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.data_ptr(), x._version)


def _probe(x: Tensor) -> Tensor:
    B, N, C = x.shape
    return x.detach()[:, :: max(1, N // 8)][:, :8, :: max(1, C // 8)][:, :, :8].float().clone()


@torch.compiler.disable
def _record(ctx: CallContext, index: int, x: Tensor) -> None:
    ctx.records[index] = Record(ref=weakref.ref(x), memory=_memory(x), probe=_probe(x))


def _probe_matches(record: Record, probe: Tensor) -> bool:
    want = record.probe.to(probe.device)
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
def _recompute_context(state: ModelState, index: int, x: Tensor):
    """(a copy of the context of the call whose block `index` is being recomputed with input x, the
    plan the block merged with there), or None if no live call merged that block with an input like x
    (then the forward did not merge it either).

    The only call that merged the block with x's shape is it. Among several, the recorded input itself,
    still alive at x's memory and version, decides (a checkpoint saved it); else the calls whose probe
    matches x's values, narrowed to the one whose input had x's memory (a reentrant checkpoint that
    dropped the original but kept its storage). RuntimeError when calls that merge differently remain.
    """
    calls = [c for c in _live_calls(state) if c.records and index in c.records]
    memory = _memory(x)
    calls = [c for c in calls if c.records[index].memory[:1] + c.records[index].memory[2:4] == memory[:1] + memory[2:4]]
    if len(calls) > 1:
        same = [c for c in calls if c.records[index].memory == memory]
        alive = [c for c in same if c.records[index].ref() is not None]
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
    return dataclasses.replace(found, blocks={}, records=None, recompute=True, shared={}), found.records[index].plan


def level_of(grid_h: int, grid_w: int, n: int) -> Optional[Tuple[int, int, int]]:
    """(downsample, h, w) of the level with n tokens, following the chain of stride-2 downsamplers
    from the grid_h × grid_w level-1 grid (each halves a side, rounding up); None if no level has n."""
    h, w, d = grid_h, grid_w, 1
    while h * w > n and (h > 1 or w > 1):
        h, w, d = -(-h // 2), -(-w // 2), d * 2
    return (d, h, w) if h * w == n else None


@torch.compiler.disable
def _timestep_value(timestep) -> Optional[float]:
    """The call's timestep as a float (one host sync per call; only for a ratio that takes it)."""
    if timestep is None:
        return None
    return float(torch.as_tensor(timestep).reshape(-1)[0].item())


def _ratio(state: ModelState, ctx: CallContext, downsample: int) -> float:
    schedule = state.config.schedule
    level = downsample if schedule.fn_takes_level else 0
    if level not in ctx.ratios:
        scale = state.host.vae_scale_factor
        t = _timestep_value(ctx.timestep) if schedule.fn_takes_timestep else None
        ctx.ratios[level] = schedule.resolve(ctx.height * scale, ctx.width * scale, downsample, t)
    return ctx.ratios[level]


def enter_block(state: ModelState, index: int, x) -> None:
    """A block starts: open its BlockCall in the current call (or in its recompute's call)."""
    frames = _frames(state)
    if frames and frames[-1] is not None and frames[-1].recompute:
        frames.pop()  # a recompute interrupted inside its block: blocks never nest
    replay = None
    if frames:
        ctx = frames[-1]
        if ctx is None:
            return  # the root call's latent was not found (warned there)
    else:
        found = _recompute_context(state, index, x) if torch.is_grad_enabled() and isinstance(x, Tensor) else None
        if found is None:
            if not any(c.records for c in _live_calls(state)):
                _warn_once(state, f"no-root-{index}", f"tomesd: transformer block {index} was called outside a "
                           f"call of {type(state.host.root).__name__}, so its token grid is unknown; it is not "
                           "merged in such calls")
            return
        ctx, replay = found
        frames.append(ctx)
    block = ctx.blocks[index] = BlockCall(pushed=ctx.recompute)
    if replay is not None:
        block.plan = replay  # the very plan of the forward
        return
    if not isinstance(x, Tensor) or x.ndim != 3:
        _warn_once(state, f"block-input-{index}", f"tomesd: transformer block {index} was called "
                   "without [B, N, C] tokens as hidden_states; it is not merged")
        return
    B, N, _ = x.shape
    if N not in ctx.levels:
        ctx.levels[N] = level_of(ctx.grid_h, ctx.grid_w, N)
    level = ctx.levels[N]
    if level is None:
        _warn_once(state, f"grid-{index}", f"tomesd: transformer block {index} has {N} tokens, which is no level "
                   f"of the {ctx.grid_h}×{ctx.grid_w} token grid of the latent (halving each side, rounding up); "
                   "it is not merged")
        return
    downsample, h, w = level
    if downsample > state.max_downsample:
        return
    cfg = state.config
    dst = (h // cfg.sy) * (w // cfg.sx)
    if dst == 0:
        _log_once(state, f"narrow-{downsample}-{h}x{w}", f"tomesd: the /{downsample} level's {h}×{w} token grid "
                  f"is narrower than one sy×sx = {cfg.sy}×{cfg.sx} dst cell, so it has no dst tokens; it is not "
                  "merged", logging.INFO)
        return
    r = min(int(N * _ratio(state, ctx, downsample)), N - dst)
    if r <= 0:
        return
    key = ctx.key
    if key is not None and B % 2 == 1:
        _log_once(state, "odd-batch", f"tomesd: batch of odd size {B}: random dst selection is off for it "
                  "(as in ToMe for SD: the conditional and unconditional halves must share a partition)",
                  logging.INFO)
        key = None
    if key is not None:
        key = mix32((key + index * 0x632BE5AB) & _MASK32)
    block.pending = Pending(metric=x, h=h, w=w, r=r, key=key, downsample=downsample)
    if ctx.records is not None:
        _record(ctx, index, x)


def exit_block(state: ModelState, index: int) -> None:
    frames = _frames(state)
    ctx = frames[-1] if frames else None
    block = ctx.blocks.pop(index, None) if ctx is not None else None
    if block is not None and block.pushed:
        frames.pop()


def on_block_call(state: ModelState, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    x, _ = _get_arg(args, kwargs, state.host.input_names, 0)
    enter_block(state, index, x)


def on_block_done(state: ModelState, index: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    exit_block(state, index)


class MethodWrapper:
    """Replaces `module.<name>` on the instance by `around(original, args, kwargs)`.

    For what module hooks cannot do: run code around a method that a checkpoint recompute calls
    directly (LDM's `checkpoint(self._forward, ...)`), or keep a context open for exactly the length
    of a forward. `remove()` restores the instance exactly; once removed, a wrapper still referenced
    elsewhere only forwards the call.
    """

    def __init__(self, module: nn.Module, name: str, around: Callable):
        self.module, self.name = module, name
        self.had = name in vars(module)
        self.previous = vars(module).get(name)
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            return around(original, args, kwargs)

        self.active = True
        self.wrapped = wrapped
        vars(module)[name] = wrapped

    def remove(self) -> None:
        self.active = False
        if vars(self.module).get(self.name) is self.wrapped:
            if self.had:
                vars(self.module)[self.name] = self.previous
            else:
                del vars(self.module)[self.name]


def _block_entry(state: ModelState, index: int, original, args: tuple, kwargs: dict):
    """enter_block → the block's method → exit_block (the entry of blocks that checkpoint `_forward`)."""
    x, _ = _get_arg(args, kwargs, state.host.input_names, 0)
    enter_block(state, index, x)
    try:
        return original(*args, **kwargs)
    finally:
        exit_block(state, index)


def _build(state: ModelState, p: Pending) -> MergePlan:
    dst_idx, src_idx = partition(p.h, p.w, state.config.sx, state.config.sy, p.key, p.metric.device)
    return ops.build_plan(p.metric, dst_idx, src_idx, p.r)


def _fits(plan: MergePlan, p: Pending) -> bool:
    """A plan made for another block or call serves this one if it maps the same tokens alike."""
    B, N, _ = p.metric.shape
    return tuple(plan.slot.shape) == (B, N) and plan.num_out == N - p.r and plan.slot.device == p.metric.device


def provide_plan(state: ModelState, ctx: CallContext, index: int, p: Pending) -> MergePlan:
    """The one place that decides where a block's plan comes from: built from its own metric, shared
    with the earlier blocks of its level in this call (share_plan), or reused from an earlier call on
    this thread (plan_every = k: rebuilt every k-th call, and whenever the shapes differ)."""
    cfg = state.config
    if cfg.share_plan:
        plan = ctx.shared.get(p.downsample)
        if plan is not None and _fits(plan, p):
            return plan
    scope = ("level", p.downsample) if cfg.share_plan else ("block", index)
    if cfg.plan_every > 1:
        if torch.compiler.is_compiling():
            raise RuntimeError("tomesd: plan_every > 1 keeps plans across calls in Python state, which "
                               "torch.compile would specialize on every call; use plan_every=1 with "
                               "torch.compile (share_plan=True composes with it)")
        reused = getattr(state.local, "reused", None)
        if reused is None:
            reused = state.local.reused = {}
        kept = reused.get(scope)
        if kept is not None and ctx.number - kept[1] < cfg.plan_every and _fits(kept[0], p):
            plan = kept[0]
        else:
            plan = _build(state, p)
            reused[scope] = (plan, ctx.number)
    else:
        plan = _build(state, p)
    if cfg.share_plan:
        ctx.shared[p.downsample] = plan
    return plan


def _plan(state: ModelState, index: int, block: BlockCall) -> Optional[MergePlan]:
    """The block's MergePlan for this call, provided on first use."""
    if block.plan is None and block.pending is not None:
        p, block.pending = block.pending, None
        frames = _frames(state)
        ctx = frames[-1]
        block.plan = provide_plan(state, ctx, index, p)
        if ctx.records is not None and index in ctx.records:
            ctx.records[index].plan = block.plan
    return block.plan


class Mode:
    """How a sub-layer runs on merged tokens. enter(...) → the sub-layer's new (args, kwargs);
    `unmerges`: its output must be unmerged back to N tokens afterwards."""

    name = ""
    unmerges = True

    def enter(self, state: ModelState, module: nn.Module, args: tuple, kwargs: dict, x: Tensor, where,
              plan: MergePlan) -> Tuple[tuple, dict]:
        raise NotImplementedError


class TokensMode(Mode):
    """Merge the sub-layer's input x [B, N, C] → [B, M, C]; its output is unmerged to [B, N, C]."""

    name = "tokens"

    def enter(self, state, module, args, kwargs, x, where, plan):
        return _set_arg(args, kwargs, where, ops.merge(x, plan))


class KVMode(Mode):
    """Self-attention with queries from all N tokens and keys/values from the M merged ones: the merged
    tokens [B, M, C] go in as the attention's key/value source (Host.kv_name); the output keeps N rows,
    so nothing is unmerged."""

    name = "kv"
    unmerges = False

    def enter(self, state, module, args, kwargs, x, where, plan):
        host = state.host
        if host.joint is not None:
            return args, kwargs  # the Joint context merges the image keys/values inside the attention
        if kwargs.get(host.kv_name) is not None or (isinstance(where, int) and len(args) > where + 1):
            raise RuntimeError(f"tomesd: mode='kv' needs a self-attention, but this attn1 was given a key/value "
                               f"source ({host.kv_name}); use mode='tokens' for this model")
        if host.kv_refusal is not None:
            why = host.kv_refusal(module)
            if why is not None:
                raise RuntimeError(f"tomesd: mode='kv' cannot run on this attn1: {why}")
        kwargs = dict(kwargs)
        kwargs[host.kv_name] = ops.merge(x, plan)
        return args, kwargs


MODES = {"tokens": TokensMode(), "kv": KVMode()}


def _size_bias(plan: MergePlan, dtype: torch.dtype) -> Tensor:
    """[B, 1, M] log of each merged token's size: a key standing for s tokens gets + log s on its logits,
    so a group of identical tokens is attended to exactly as its members would be (proportional attention)."""
    return plan.counts.to(torch.float32).log()[:, None, :].to(dtype)


def _merge_heads(t: Tensor, plan: MergePlan) -> Tensor:
    """Merge keys or values laid out per head: [B, H, N, D] → [B, H, M, D]."""
    B, H, N, D = t.shape
    merged = ops.merge(t.transpose(1, 2).reshape(B, N, H * D), plan)
    return merged.view(B, plan.num_out, H, D).transpose(1, 2)


class Joint(TorchFunctionMode):
    """Open for one joint-attention forward (MMDiT): its first F.scaled_dot_product_attention call gets
    the image part of its keys and values merged (merge_kv: kv mode) and / or the log-size bias on the
    image keys' logits (bias: prop_attn). The image part is the first or last `plan.num_in` (kv mode) or
    `plan.num_out` (tokens mode: already merged) positions of the [B, H, S, D] keys, after every
    projection, norm and rotary embedding the processor applied. Queries are untouched."""

    def __init__(self, plan: MergePlan, merge_kv: bool, bias: bool, image_first: bool):
        super().__init__()
        self.plan, self.merge_kv, self.bias, self.image_first = plan, merge_kv, bias, image_first
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention or self.used:
            return func(*args, **kwargs)
        self.used = True
        names = ("query", "key", "value", "attn_mask")
        values = dict(zip(names, args))
        values.update({n: kwargs.pop(n) for n in names if n in kwargs})
        rest = args[len(names):]
        q, k, v = values["query"], values["key"], values["value"]
        if values.get("attn_mask") is not None:
            raise RuntimeError("tomesd: mode='kv' / prop_attn on a joint attention that is given an attention "
                               "mask is not supported")
        S, plan = k.shape[2], self.plan
        n = plan.num_in if self.merge_kv else plan.num_out
        image = slice(0, n) if self.image_first else slice(S - n, S)
        text = slice(n, S) if self.image_first else slice(0, S - n)
        if self.merge_kv:
            parts = [_merge_heads(k[:, :, image], plan), k[:, :, text]]
            vparts = [_merge_heads(v[:, :, image], plan), v[:, :, text]]
            if not self.image_first:
                parts, vparts = parts[::-1], vparts[::-1]
            k, v = torch.cat(parts, dim=2), torch.cat(vparts, dim=2)
        mask = None
        if self.bias:
            zeros = q.new_zeros(q.shape[0], S - n)
            size = _size_bias(plan, q.dtype)[:, 0]
            mask = torch.cat([size, zeros] if self.image_first else [zeros, size], dim=1)[:, None, None, :]
        return func(q, k, v, mask, *rest, **kwargs)


def _joint_forward(state: ModelState, index: int, name: str, original, args: tuple, kwargs: dict):
    """A joint attention's forward, inside its Joint context when the pre-hook left one."""
    block = _block_call(state, index)
    joint = block.joint.pop(name, None) if block is not None else None
    if joint is None:
        return original(*args, **kwargs)
    with joint:
        out = original(*args, **kwargs)
    if not joint.used:
        raise RuntimeError(f"tomesd: {name} of transformer block {index} did not call torch's "
                           "scaled_dot_product_attention, so its image keys/values cannot be merged "
                           "(mode='kv' / prop_attn on MMDiT models need the native attention backend)")
    return out


def _rows(plan: MergePlan, start: int, stop: int) -> MergePlan:
    return MergePlan(slot=plan.slot[start:stop], counts=plan.counts[start:stop], num_out=plan.num_out)


def on_sublayer_call(state: ModelState, index: int, name: str, module: nn.Module, args: tuple, kwargs: dict):
    block = _block_call(state, index)
    if block is None or (block.pending is None and block.plan is None):
        return None
    host = state.host
    if host.sublayer_refusal is not None:
        why = host.sublayer_refusal(module)
        if why is not None:
            _warn_once(state, f"refused-{name}-{why}", f"tomesd: {name} is not merged in blocks where {why}")
            return None
    kind = state.kinds[name]
    if kind == "self" and host.joint is None and any(kwargs.get(m) is not None for m in host.mask_names):
        _warn_once(state, "mask", "tomesd: a self-attention mask was passed to attn1; blocks called with one "
                   "are not merged (the mask is over unmerged tokens)")
        block.pending = block.plan = None
        return None
    plan = _plan(state, index, block)
    x, where = _get_arg(args, kwargs, host.input_names, 0)
    if not isinstance(x, Tensor) or x.ndim != 3:
        _warn_once(state, f"shape-{name}", f"tomesd: {name} was called without [B, N, C] tokens; it is not merged")
        return None
    B, N = plan.slot.shape
    mode = state.modes[name]
    # a joint attention in kv mode merges inside its SDPA call: its input may hold the text tokens too
    inside = host.joint is not None and kind == "self" and mode.name == "kv"
    if x.shape[1] != N and not inside:
        _warn_once(state, f"chunk-{name}", f"tomesd: {name} was called on {x.shape[1]} of a block's {N} tokens "
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
        _warn_once(state, f"shape-{name}", f"tomesd: {name} was called with a batch of {x.shape[0]} rows, not the "
                   f"block's {B}; it is not merged there")
        return None
    args, kwargs = mode.enter(state, module, args, kwargs, x, where, used)
    prop = kind == "self" and state.config.prop_attn
    if host.joint is not None and kind == "self" and (prop or mode.name == "kv"):
        block.joint[name] = Joint(used, merge_kv=mode.name == "kv", bias=prop, image_first=host.joint == "first")
    elif prop:
        kwargs = dict(kwargs)
        kwargs[host.bias_name] = _size_bias(used, x.dtype)
    if mode.unmerges:
        block.merged[name] = used
    return args, kwargs


def on_sublayer_done(state: ModelState, index: int, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
    block = _block_call(state, index)
    plan = block.merged.pop(name, None) if block is not None else None
    if plan is None:
        return None
    if isinstance(output, tuple):  # a joint attention: (image tokens, text tokens)
        return (ops.unmerge(output[0], plan),) + output[1:]
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


def owner(block: nn.Module) -> Optional[ModelState]:
    """The state of the patch that merges in `block`, if any."""
    state = _OWNERS.get(block)
    return state if state is not None and state.active else None


def _check_modes(host: Host, config: ToMeConfig) -> None:
    """Refuse, when patching, what the host's attention cannot do for the chosen mode."""
    if host.tokens_refusal is not None and config.mode == "tokens" and config.merge_attn:
        raise ValueError(f"tomesd: mode='tokens' cannot merge the attention of {type(host.root).__name__}: "
                         f"{host.tokens_refusal}; use mode='kv' (or merge_attn=False)")
    if config.prop_attn and host.bias_name is None and host.joint is None:
        raise ValueError(f"prop_attn=True needs an attention that takes an additive bias; {host.name} models' "
                         "attention takes none: use prop_attn=False")
    if config.mode == "kv" and config.merge_attn and host.kv_refusal is not None and host.joint is None:
        for index, module in enumerate(host.blocks):
            attn = getattr(module, host.sublayers[0].name, None)
            why = host.kv_refusal(attn) if isinstance(attn, nn.Module) else None
            if why is not None:
                raise ValueError(f"tomesd: mode='kv' cannot run on attn1 of transformer block {index}: {why}")


def attach(host: Host, config: ToMeConfig) -> ModelState:
    """Register every hook on host's modules; the returned state owns their handles."""
    config = config.resolved(host.default_mode)
    state = ModelState(
        config=config,
        host=host,
        max_downsample=config.max_downsample or host.top_level,
        base_key=base_key(config.seed) if config.use_rand else 0,
        sample_pos=arg_position(host.root, host.sample_names, 0),
        timestep_pos=arg_position(host.root, host.timestep_names, 1),
    )
    _check_modes(host, config)
    state.kinds = {sub.name: sub.kind for sub in host.sublayers}
    state.modes = {sub.name: MODES[config.mode if sub.kind == "self" else "tokens"] for sub in host.sublayers}
    reasons: Dict[str, int] = {}
    for _, reason in host.excluded:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        logger.info("tomesd: %d transformer block(s) of %s are not patched: %s", count, type(host.root).__name__, reason)
    if state.max_downsample < host.top_level:
        logger.warning("tomesd: max_downsample=%d but the highest-resolution transformer level of %s is /%d: "
                       "nothing is merged (use max_downsample=None for that level, or a larger value)",
                       state.max_downsample, type(host.root).__name__, host.top_level)
    add = state.handles.append
    add(host.root.register_forward_pre_hook(partial(on_root_call, state), with_kwargs=True))
    add(host.root.register_forward_hook(partial(on_root_done, state), with_kwargs=True, always_call=True))
    subs = [sub for sub in host.sublayers if getattr(config, KIND_FLAGS[sub.kind])]
    for index, module in enumerate(host.blocks):
        method = host.entry(module) if host.entry is not None else None
        if method is not None:
            add(MethodWrapper(module, method, partial(_block_entry, state, index)))
        else:
            add(module.register_forward_pre_hook(partial(on_block_call, state, index), with_kwargs=True))
            add(module.register_forward_hook(partial(on_block_done, state, index), with_kwargs=True, always_call=True))
        for spec in subs:
            name, sub = spec.name, getattr(module, spec.name, None)
            if isinstance(sub, nn.Module):
                add(sub.register_forward_pre_hook(partial(on_sublayer_call, state, index, name), with_kwargs=True))
                add(sub.register_forward_hook(partial(on_sublayer_done, state, index, name), with_kwargs=True))
                if host.joint is not None and spec.kind == "self":
                    add(MethodWrapper(sub, "forward", partial(_joint_forward, state, index, name)))
        _OWNERS[module] = state
    setattr(host.root, STATE_ATTR, state)
    return state


def detach(root: nn.Module) -> None:
    """Remove every hook `attach` put on root's model; a no-op if it is not patched."""
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        return
    state.active = False
    for handle in state.handles:
        handle.remove()
    state.handles.clear()
    for module in state.host.blocks:
        if _OWNERS.get(module) is state:
            del _OWNERS[module]
    delattr(root, STATE_ATTR)
