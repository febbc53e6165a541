"""Attaching to hosts: a host-agnostic engine, and one module per kind of model under hosts/.

The rooms (see README "Architecture"): state (per-model and per-call state, the per-thread call
stack), calls (a denoiser call's and a block's life), plans (build / share / reuse plans),
recompute (finding a call again under gradient checkpointing), modes/ (tokens, kv: what a merged
sub-layer does), sublayers (the sub-layer hooks), attach (hooks on, hooks off), hosts/ (diffusers,
LDM, MMDiT), levels and args (geometry, argument reading), wrappers and compiled (helpers).

Documented seams (for tests and tools): `patched_state(model)` → the ModelState (`.config`,
`.host`, `.live`); `current_plan(state, block_index)` → the plan a block merges with in the current
call; `plans.PlanProvider.build` — every plan build goes through it.
"""
from __future__ import annotations

from .attach import attach, attach_to, detach, detach_from, patched_state
from .hosts import Host, find_host
from .levels import level_of
from .plans import PlanProvider
from .state import ModelState, current_plan

__all__ = ["Host", "ModelState", "PlanProvider", "attach", "detach", "find_host", "attach_to", "detach_from",
           "patched_state", "current_plan", "level_of"]
