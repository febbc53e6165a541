"""Attaching a configuration to a host's modules (and taking it off again), and to whole models:
hooks only, never a copied forward; removing them restores the model exactly."""
from __future__ import annotations

import logging
from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn

from .. import keys
from ..config import ToMeConfig
from . import hosts, modes
from .args import arg_position
from .calls import block_entry, on_block_call, on_block_done, on_root_done, root_pre_hook
from .compiled import is_compiled
from .hosts import Host
from .plans import PlanProvider
from .state import STATE_ATTR, ModelState, check_idle, claim, owner, release, take_slot
from .sublayers import on_sublayer_call, on_sublayer_done
from .wrappers import MethodWrapper, ProcessorWrapper

logger = logging.getLogger("tomesd")


def prepare(host: Host, config: ToMeConfig) -> ToMeConfig:
    """config resolved for host (its mode and a prop_attn left to follow it); ValueError listing every
    reason the host refuses it. Nothing is changed on the model."""
    resolved = modes.resolve(config, host)
    reasons = host.refusals(resolved) + modes.refusals(host, resolved)
    if reasons:
        raise ValueError("tomesd: " + "; ".join(reasons))
    return resolved


def attach(host: Host, config: ToMeConfig, prepared: Optional[ToMeConfig] = None) -> ModelState:
    """Register every hook on host's modules; the returned state owns their handles. `prepared`: config
    already passed through `prepare` for this host."""
    given = config
    config = prepared if prepared is not None else prepare(host, config)
    state = ModelState(
        config=config,
        host=host,
        max_downsample=config.max_downsample or host.top_level,
        base_key=keys.base_key(config.seed) if config.use_rand else 0,
        sample_pos=arg_position(host.root, host.sample_names, 0),
        timestep_pos=arg_position(host.root, host.timestep_names, 1),
        plans=PlanProvider(config, anchors=modes.merges_inputs(config) and host.attention.moves_positions),
    )
    whole = modes.merges_inputs(config)
    subs = [host.block_sublayers(module, config, whole) for module in host.blocks]
    state.modes = modes.make(config, host, {s.name: s for block_subs in subs for s in block_subs}.values())
    _log_exclusions(state, prop_given=given.prop_attn is not None)
    add = state.handles.append
    add(host.root.register_forward_pre_hook(root_pre_hook(state), with_kwargs=True))
    add(host.root.register_forward_hook(partial(on_root_done, state), with_kwargs=True, always_call=True))
    for index, module in enumerate(host.blocks):
        method = host.entry(module)
        if method is not None:
            add(MethodWrapper(module, method, partial(block_entry, state, index)))
        else:
            add(module.register_forward_pre_hook(partial(on_block_call, state, index), with_kwargs=True))
            add(module.register_forward_hook(partial(on_block_done, state), with_kwargs=True, always_call=True))
        for spec in subs[index]:
            _attach_sublayer(state, host, module, spec)
        claim(module, state)
    if callable(getattr(host.root, "set_default_attn_processor", None)) and any(
            isinstance(h, ProcessorWrapper) for h in state.handles):
        add(MethodWrapper(host.root, "set_default_attn_processor", partial(_default_processors, state)))
    setattr(host.root, STATE_ATTR, state)
    return state


def _attach_sublayer(state: ModelState, host: Host, block: nn.Module, spec) -> None:
    """Hooks of sub-layer `spec` of `block` (a whole block's come after the block's entry pre-hook and
    before its exit hook), and the wrapper of the attention processor its merge acts in."""
    sub = host.sublayer_module(block, spec)
    if sub is None:
        return
    add = state.handles.append
    add(sub.register_forward_pre_hook(partial(on_sublayer_call, state, spec.name, spec.kind), with_kwargs=True))
    # on the block itself, the sub-layer's post-hook runs before the block's (which closes it)
    add(sub.register_forward_hook(partial(on_sublayer_done, state, spec.name), with_kwargs=True,
                                  prepend=sub is block))
    found = spec.attention_in(block)
    if found is not None:
        handle = host.attention.wrap(found[0], found[1], partial(take_slot, state), state.config.prop_attn, state)
        if handle is not None:
            add(handle)
def _default_processors(state: ModelState, original, args: tuple, kwargs: dict):
    """The root's set_default_attn_processor() while patched: diffusers checks the processors' classes and
    knows no wrapper's, so it runs on the wrapped processors; the defaults it sets then replace them, as
    any processor set after patching (tomesd.patch.wrappers.own_processor)."""
    wrapped = [h for h in state.handles if isinstance(h, ProcessorWrapper) and h.module.processor is h]
    for wrapper in wrapped:
        wrapper.module.processor = wrapper.inner
    try:
        return original(*args, **kwargs)
    except BaseException:
        for wrapper in wrapped:
            if wrapper.module.processor is wrapper.inner:
                wrapper.module.processor = wrapper
        raise


def _log_exclusions(state: ModelState, prop_given: bool) -> None:
    host = state.host
    counts: Dict[str, int] = {}
    for _, reason in host.excluded:
        counts[reason] = counts.get(reason, 0) + 1
    for reason, count in counts.items():
        logger.info("tomesd: %d transformer block(s) of %s are not patched: %s", count, type(host.root).__name__, reason)
    config = state.config
    if not (config.merge_attn or config.merge_crossattn or config.merge_mlp):
        logger.warning("tomesd: merge_attn, merge_crossattn and merge_mlp are all False: no sub-layer of %s "
                       "merges tokens", type(host.root).__name__)
    for note in modes.notes(host, config, prop_given):
        logger.info(note)
    if state.max_downsample < host.top_level:
        logger.warning("tomesd: max_downsample=%d but the highest-resolution transformer level of %s is /%d: "
                       "nothing is merged (use max_downsample=None for that level, or a larger value)",
                       state.max_downsample, type(host.root).__name__, host.top_level)


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
        release(module, state)
    if state.plans is not None:
        state.plans.release()
    delattr(root, STATE_ATTR)


def _claim(host: Host) -> None:
    """One patch per block: a patch of a module inside host's root gives way (logged); a patch of a
    module around it is an error, since it already merges in these blocks."""
    others = {}
    for block in host.blocks:
        state = owner(block)
        if state is not None and state.host.root is not host.root:
            others[id(state)] = state
    inside = {id(m) for m in host.root.modules()}
    for state in others.values():
        other = state.host.root
        if id(other) not in inside:
            raise ValueError(
                f"tomesd: {type(other).__name__} is patched and holds the transformer blocks of this "
                f"{type(host.root).__name__}; remove_patch it first, or patch only one of them"
            )
        logger.info("tomesd: replacing the patch of %s, which is inside %s", type(other).__name__,
                    type(host.root).__name__)
        detach(other)


def _after_change(model, roots: List[nn.Module]) -> None:
    """Compiled code does not see hooks added or removed after tracing: recompile on the next call."""
    if any(is_compiled(m) for m in hosts.wrappers(model) + roots):
        logger.warning("tomesd: the model is compiled (torch.compile); compiled code does not see hooks "
                       "added or removed after it was traced, so torch.compiler.reset() was called and the next "
                       "call recompiles. Patch before compiling to avoid the recompile")
        torch.compiler.reset()


def attach_to(model, config: ToMeConfig, controlnet: bool = False) -> None:
    """Attach `config` to model's denoiser (and its ControlNets), replacing earlier patches."""
    found = [hosts.find_host(model)] + (hosts.controlnet_hosts(model) if controlnet else [])
    prepared = [prepare(host, config) for host in found]  # every refusal before anything changes
    _detach_roots(model, "apply_patch")
    for host in found:
        _claim(host)
    for host, resolved in zip(found, prepared):
        attach(host, config, resolved).plans.watch(model)  # a pipeline's scheduler tells runs apart
    _after_change(model, [host.root for host in found])


def detach_from(model) -> None:
    """Remove tomesd from model's denoiser and, for a pipeline, its ControlNets."""
    roots = _detach_roots(model)
    if roots:
        _after_change(model, roots)


def _detach_roots(model, action: str = "remove_patch") -> List[nn.Module]:
    roots = [root for root in hosts.roots(model) if getattr(root, STATE_ATTR, None) is not None]
    for root in roots:
        check_idle(getattr(root, STATE_ATTR), action)
    for root in roots:
        detach(root)
    return roots


def patched_state(model):
    """The ModelState of a patched model (pipeline, denoiser or LDM wrapper), else None."""
    for root in hosts.roots(model):
        state = getattr(root, STATE_ATTR, None)
        if state is not None:
            return state
    return None
