"""What the engine needs to know about a kind of model (a Host), and how its self-attention takes
keys/values from merged tokens and an additive bias (an Attention)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ... import ops
from ...config import ToMeConfig
from ...matching import MergePlan
from ..frames import SublayerCall

# take(name) → (what sub-layer `name` of the block running now left for its processor, the block's
# index), taken out of its slot, or None (a wrapped processor's view of the current call)
Take = Callable[[str], Optional[Tuple[Any, int]]]


@dataclass(frozen=True)
class Sublayer:
    """A sub-layer of a transformer block that can run on merged tokens.

    name: its attribute on the block. kind: "self" — attention among the image tokens (self- or joint
    attention): the mode (tokens / kv) applies there and prop_attn biases it; "cross" — attention from
    the image tokens to the text; "mlp" — the feed-forward; "block" — the whole block (its module is
    the block itself), a residual block that takes the image tokens as its input and returns them
    (alone, or last of a tuple): merged before it, and each token rebuilt after it as its own input plus
    the unmerged change of its row (Flux's single-stream blocks in tokens mode, whose attention and MLP
    run side by side on one sequence); `attention` names the block's attention sub-module, whose
    processor carries the merge's positions and prop_attn. merge_attn / merge_crossattn / merge_mlp
    choose the kinds (merge_attn: "self" and "block").
    """

    name: str
    kind: str
    attention: str = ""

    def module_in(self, block: nn.Module) -> Optional[nn.Module]:
        """This sub-layer's module in `block` (None if the block has none)."""
        module = block if self.kind == "block" else getattr(block, self.name, None)
        return module if isinstance(module, nn.Module) else None

    def attention_in(self, block: nn.Module) -> Optional[Tuple[str, nn.Module]]:
        """(name, module) of the attention whose processor this sub-layer's merge acts in, if any."""
        name = self.name if self.kind == "self" else self.attention if self.kind == "block" else ""
        module = getattr(block, name, None) if name else None
        return (name, module) if isinstance(module, nn.Module) else None


KIND_FLAGS = {"self": "merge_attn", "cross": "merge_crossattn", "mlp": "merge_mlp"}
KIND_NAMES = {"self": "self-attention", "cross": "cross-attention", "mlp": "feed-forward"}
ATTENTION_KINDS = ("self", "block")  # kinds the mode and prop_attn act in (a whole block: its attention)
BLOCK_FLAG = "merge_attn"  # the flag that merges a whole block
UNET_SUBLAYERS = (Sublayer("attn1", "self"), Sublayer("attn2", "cross"), Sublayer("ff", "mlp"))


def size_bias(plan: MergePlan, dtype: torch.dtype) -> Tensor:
    """[B, 1, M] log of each merged token's size: a key standing for s tokens gets + log s on its logits,
    so a group of identical tokens is attended to exactly as its members would be (proportional attention)."""
    return plan.counts.to(torch.float32).log()[:, None, :].to(dtype)


class Attention:
    """How a host's self-attention sub-layer takes keys/values from merged tokens (kv mode) and a
    log-size bias on its logits (prop_attn).

    kv_inside: keys/values are merged inside the attention's own computation (its input may then
    hold more than the block's image tokens). takes_bias: it can add a bias to its logits (prop_attn).
    prepare(call, args, kwargs, plan, merge_kv, bias) → the sub-layer's (args, kwargs) for the call
    (what a mode asks: merged keys/values, a log-size bias). refusals(host, config) → why the config's
    options cannot run on this host's attention (at patching). kv_refusal_of(module) → why that
    attention module cannot take keys/values from merged tokens, or None. masked(kwargs): the call
    passes an attention mask over unmerged tokens (the block is not merged). wrap(name, module, take,
    bias, owner) → a handle (with .remove()) around the sub-layer's processor, if the attention needs one
    (bias: prop_attn is on; owner: the patch, SublayerCall.owner); the wrapped processor finds what a
    call left for it with `take(name)`. refusal(call, merge_kv, bias) → why this call cannot take merged
    keys/values or the bias (the sub-layer is then left unmerged, said), or None.
    moves_positions: token positions (rotary embeddings) are applied inside the attention, so merged
    tokens need their rows' anchors (MergePlan.anchor) and `prepare` is asked even without prop_attn.
    tokens_refusal(call) → why this call cannot run on merged tokens (tokens mode), or None.
    """

    kv_inside = False
    takes_bias = True
    moves_positions = False

    def prepare(self, call: SublayerCall, args: tuple, kwargs: dict, plan: MergePlan, merge_kv: bool,
                bias: bool) -> Tuple[tuple, dict]:
        raise NotImplementedError

    def refusals(self, host: "Host", config: ToMeConfig) -> List[str]:
        return []

    def kv_refusal_of(self, module: nn.Module) -> Optional[str]:
        return None

    def masked(self, kwargs: dict) -> bool:
        return False

    def tokens_refusal(self, call: SublayerCall) -> Optional[str]:
        return None

    def wrap(self, name: str, module: nn.Module, take: Take, bias: bool, owner: Any = None):
        return None

    def refusal(self, call: SublayerCall, merge_kv: bool, bias: bool) -> Optional[str]:
        return None


class ArgAttention(Attention):
    """An attention module taking the key/value source as argument `kv_name` and an additive float
    bias on its logits as `bias_name` (None: it takes none); `kv_refusal(module)` → why keys/values
    cannot come from a separate input there, or None."""

    def __init__(self, kv_name: str, bias_name: Optional[str], mask_names: Sequence[str] = ("attention_mask", "mask"),
                 kv_refusal=None):
        self.kv_name, self.bias_name, self.mask_names, self.kv_refusal = kv_name, bias_name, tuple(mask_names), kv_refusal

    @property
    def takes_bias(self) -> bool:
        return self.bias_name is not None

    def masked(self, kwargs):
        return any(kwargs.get(m) is not None for m in self.mask_names)

    def refusals(self, host, config):
        if config.prop_attn and self.bias_name is None:
            return [f"prop_attn=True needs an attention that takes an additive bias; {host.name} models' "
                    "attention takes none: use prop_attn=False"]
        return []

    def kv_refusal_of(self, module):
        return self.kv_refusal(module) if self.kv_refusal is not None else None

    def _has_kv_source(self, call) -> bool:
        return call.kwargs.get(self.kv_name) is not None or (isinstance(call.where, int) and len(call.args) > call.where + 1)

    def prepare(self, call, args, kwargs, plan, merge_kv, bias):
        if bias and not merge_kv and self._has_kv_source(call):
            # an attn1 attending to the text (only_cross_attention): its keys are not the merged tokens
            call.warn(f"prop-cross-{call.name}", f"tomesd: prop_attn does not apply to {call.name} of blocks "
                      "whose self-attention attends to the text (only_cross_attention): its keys are not the "
                      "merged tokens; those blocks merge without it")
            bias = False
        if merge_kv:
            if self._has_kv_source(call):
                raise RuntimeError(f"tomesd: mode='kv' needs a self-attention, but this attn1 was given a key/value "
                                   f"source ({self.kv_name}); use mode='tokens' for this model")
            why = self.kv_refusal_of(call.module)
            if why is not None:
                raise RuntimeError(f"tomesd: mode='kv' cannot run on this attn1: {why}")
            kwargs = dict(kwargs)
            kwargs[self.kv_name] = ops.merge(call.x, plan)
        if bias:
            kwargs = dict(kwargs)
            kwargs[self.bias_name] = size_bias(plan, call.x.dtype)
        return args, kwargs


@dataclass
class Host:
    """What patching needs to know about one kind of model.

    root: the denoiser whose forward takes the latent [B, C, H, W] (or [B, C, F, H, W] /
    [B, F, C, H, W]; H, W are always the last two dims) as its sample argument.
    blocks: its transformer blocks to patch, in module order. top_level: downsample factor of its
    highest-resolution transformer level, in tokens of the patch grid. patch_size: the token grid
    at level 1 is (H // patch_size) × (W // patch_size) (DiT, PixArt: the patch embedding's size).
    sublayers: the blocks' Sublayers. excluded: blocks found but deliberately not patched, with the
    reason (logged once when patching). attention: how its self-attention takes merged keys/values and
    a bias. mode_refusals: mode name → why that mode cannot run in its "self" sub-layers (e.g. per-token
    rotary positions), and what to use instead. default_mode: the mode of `apply_patch(..., mode=None)`.
    timestep_scale: what
    the root's timestep argument is multiplied by to give the 0–1000 scale ratio callables see (Flux
    receives t / 1000).
    Methods a host kind may override: entry, locate, sublayer_refusals, block_sublayers, export_inputs,
    sublayer_module, image_tokens, call_refusal.
    """

    name: str
    root: nn.Module
    blocks: Sequence[nn.Module]
    top_level: int
    attention: Attention
    vae_scale_factor: int = 8
    patch_size: int = 1
    sample_names: Tuple[str, ...] = ("sample", "x", "hidden_states")
    timestep_names: Tuple[str, ...] = ("timestep", "timesteps", "t")
    input_names: Tuple[str, ...] = ("hidden_states", "x")
    sublayers: Tuple[Sublayer, ...] = UNET_SUBLAYERS
    excluded: Tuple[Tuple[nn.Module, str], ...] = ()
    mode_refusals: Dict[str, str] = field(default_factory=dict)
    default_mode: str = "tokens"
    timestep_scale: float = 1.0

    def sublayer_module(self, block: nn.Module, spec: Sublayer) -> Optional[nn.Module]:
        """The module whose hooks merge sub-layer `spec` of `block`: Sublayer.module_in (its attribute
        `spec.name`, the block itself for kind "block"; None if it has none); a host whose self-attention is
        no module of its own names the block itself."""
        return spec.module_in(block)

    def image_tokens(self, index: int, x: Tensor, n: int) -> Tensor:
        """The tokens of block `index`'s input x [B, S, C] that are the image grid and its tail (n tokens
        at the top level): x itself, except in hosts whose blocks also take other tokens in that input
        (ComfyUI's single-stream Flux blocks: the text first)."""
        return x

    def call_refusal(self, block: nn.Module, args: tuple, kwargs: dict) -> Optional[str]:
        """Why `block` must not merge in this call of it (called as block(*args, **kwargs)), or None: e.g. a
        patch of the host's own replaces its self-attention past tomesd's hooks."""
        return None

    def entry(self, block: nn.Module) -> Optional[str]:
        """The name of a block method to wrap as the block's entry instead of forward hooks, or None."""
        return None

    def locate(self, args: tuple, kwargs: dict):
        """(H, W) of the latent for a root whose sample is not a [B, C, H, W] latent, or (H, W, head, tail)
        when `head` tokens before its grid and `tail` after it pass through unmerged; a str saying why the
        call's token layout cannot be merged; else None."""
        return None

    def block_sublayers(self, block: nn.Module, config: ToMeConfig, merges_inputs: bool) -> List[Sublayer]:
        """The Sublayers of `block` that merge under `config` (merges_inputs: its mode merges the
        sub-layers' input tokens, as tokens mode does); by default the host's, chosen by the merge_* flags."""
        return [sub for sub in self.sublayers if getattr(config, KIND_FLAGS.get(sub.kind, BLOCK_FLAG))]
    def export_inputs(self, args: tuple, kwargs: dict):
        """A context in which a traced export of the root (torch.export) takes what this host reads from
        input values (locate) from these example inputs; nothing to do for hosts that read shapes only."""
        return contextlib.nullcontext()

    def sublayer_refusals(self, module: nn.Module) -> List[str]:
        """Why merging before sub-layer `module` would be wrong at this call ([] if it is fine)."""
        return []

    def refusals(self, config: ToMeConfig) -> List[str]:
        """Why `config` cannot run on this model (checked when patching)."""
        reasons = []
        kinds = {sub.kind for sub in self.sublayers}
        for kind, flag in KIND_FLAGS.items():
            if getattr(config, flag) and kind not in kinds:
                reasons.append(f"{flag}=True but the transformer blocks of {type(self.root).__name__} have no "
                               f"{KIND_NAMES[kind]} sub-layer to merge; use {flag}=False")
        return reasons + self.attention.refusals(self, config)
