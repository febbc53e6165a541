"""Where a block's MergePlan comes from: the one place that knows share_plan and plan_every exist.

A plan is built from the block's own metric (`PlanProvider.build`, the seam tests wrap to count or
record builds), shared with the earlier blocks of its level in the same denoiser call (share_plan),
or reused from an earlier call of the same sampling run on the same thread (plan_every = k: rebuilt
every k-th call, and whenever the shapes differ). Kept plans never outlive their run: a call whose
timestep is above the previous call's starts a new run (samplers count down), and a call that raised
or was interrupted drops them, so identical pipeline calls give identical images.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch

from .. import matching, ops
from ..config import ToMeConfig
from ..matching import MergePlan
from .frames import CallContext, MergeRequest


COMPILE_ERROR = ("tomesd: plan_every > 1 keeps plans across calls in Python state, which torch.compile would "
                 "specialize on every call; use plan_every=1 with torch.compile (share_plan=True composes with it)")


class _Kept(threading.local):
    """Per thread: plans kept for reuse (scope → (plan, call number)), the call count of the current
    run and the previous call's timestep."""

    def __init__(self):
        self.plans: Dict[tuple, Tuple[MergePlan, int]] = {}
        self.number = -1
        self.last_t: Optional[float] = None

    def __reduce__(self):  # a copy keeps no plans
        return (_Kept, ())


def fits(plan: MergePlan, request: MergeRequest) -> bool:
    """A plan made for another block or call serves this one if it maps the same tokens alike."""
    B, N, _ = request.metric.shape
    m = request.metric
    return tuple(plan.slot.shape) == (B, N) and plan.num_out == N - request.r and plan.slot.device == m.device


def with_tail(plan: MergePlan, tail: int) -> MergePlan:
    """plan [B, N] → [B, N + tail]: the tail tokens (reference images after the image grid) each get an
    output row of their own after the plan's M, so they pass through merge and unmerge unchanged."""
    B, N = plan.slot.shape
    rows = torch.arange(plan.num_out, plan.num_out + tail, device=plan.slot.device, dtype=plan.slot.dtype)
    slot = torch.cat([plan.slot, rows.expand(B, tail)], dim=1)
    counts = torch.cat([plan.counts, plan.counts.new_ones(B, tail)], dim=1)
    offsets = members = None
    if plan.offsets is not None and plan.members is not None:
        steps = torch.arange(1, tail + 1, device=plan.offsets.device, dtype=plan.offsets.dtype)
        offsets = torch.cat([plan.offsets, plan.offsets[:, -1:] + steps], dim=1)
        members = torch.cat([plan.members, (N + steps - 1).to(plan.members.dtype).expand(B, tail)], dim=1)
    return MergePlan(slot=slot, counts=counts, num_out=plan.num_out + tail, offsets=offsets, members=members)


@torch.compiler.disable
def _timestep_value(timestep) -> Optional[float]:
    return None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0].item())


class PlanProvider:
    """Builds, shares and reuses the plans of one patched model (see the module docstring)."""

    def __init__(self, config: ToMeConfig):
        self.config = config
        self.kept = _Kept()
        self._hold()

    def __setstate__(self, values):  # a copy of a patched model holds the neighbourhood cache too
        self.__dict__.update(values)
        self._hold()

    def _hold(self) -> None:
        if self.config.match_window is not None:
            matching.NEIGHBOURHOODS.hold(self)

    def release(self) -> None:
        """The patch is removed: local matching's neighbourhood cache empties when nothing else holds it."""
        matching.NEIGHBOURHOODS.release(self)

    def build(self, request: MergeRequest) -> MergePlan:
        """A new plan from the request's own metric: partition of its grid, then the matching."""
        cfg = self.config
        metric = request.metric[:, : request.metric.shape[1] - request.tail] if request.tail else request.metric
        dst_idx, src_idx = matching.partition(request.h, request.w, cfg.sx, cfg.sy, request.key, metric.device)
        window = None if cfg.match_window is None else matching.LocalWindow(request.h, request.w, cfg.sx, cfg.sy,
                                                                            cfg.match_window)
        plan = ops.build_plan(metric, dst_idx, src_idx, request.r, window)
        return with_tail(plan, request.tail) if request.tail else plan

    def begin_call(self, ctx: CallContext) -> None:
        """A denoiser call starts on this thread (only plan_every > 1 counts calls)."""
        if self.config.plan_every == 1:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_ERROR)
        kept = self.kept
        t = _timestep_value(ctx.timestep)
        if t is not None and kept.last_t is not None and t > kept.last_t:
            self.drop()  # the timestep went up: a new sampling run
        kept.last_t = t
        kept.number += 1

    def drop(self) -> None:
        """Forget this thread's kept plans (a new run, or a call that did not finish)."""
        kept = self.kept
        kept.plans.clear()
        kept.number = -1
        kept.last_t = None

    def provide(self, ctx: CallContext, index: int, request: MergeRequest) -> MergePlan:
        """Block `index`'s plan in call ctx: shared, reused or built."""
        cfg = self.config
        if cfg.share_plan:
            plan = ctx.shared.get(request.downsample)
            if plan is not None and fits(plan, request):
                return plan
        if cfg.plan_every > 1:
            plan = self._reused(ctx, index, request)
        else:
            plan = self.build(request)
        if cfg.share_plan:
            ctx.shared[request.downsample] = plan
        return plan

    def _reused(self, ctx: CallContext, index: int, request: MergeRequest) -> MergePlan:
        scope = ("level", request.downsample) if self.config.share_plan else ("block", index)
        kept = self.kept
        found = kept.plans.get(scope)
        if found is not None and kept.number - found[1] < self.config.plan_every and fits(found[0], request):
            return found[0]
        plan = self.build(request)
        kept.plans[scope] = (plan, kept.number)
        return plan
