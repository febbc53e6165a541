"""Where a block's MergePlan comes from: the one place that knows share_plan and plan_every exist.

A plan is built from the block's own metric (`PlanProvider.build`, the seam tests wrap to count or
record builds), shared with the earlier blocks of its level in the same denoiser call (share_plan),
or reused from an earlier call of the same sampling run on the same thread (plan_every = k: rebuilt
every k-th call, and whenever the shapes differ). Kept plans never outlive their run, so identical
pipeline calls give identical images. A new run starts
- when the patched pipeline's scheduler (whichever `pipe.scheduler` is at the call) was set up again:
  every diffusers pipeline call starts with `scheduler.set_timesteps`, which gives the scheduler a new
  `timesteps` tensor (the signal holds for a run stopped between steps, e.g. by a callback raising; a
  second call per step, CFG done apart or a second-order sampler, does not set it up again);
- when the timestep goes above the previous call's (samplers count down): the only signal for a model
  patched without its pipeline (`apply_patch(pipe.unet)`) or called outside one;
and a call that raised or was interrupted drops the kept plans.
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from .. import matching, ops
from ..config import ToMeConfig
from ..matching import MergePlan
from .frames import CallContext, MergeRequest


COMPILE_ERROR = ("tomesd: plan_every > 1 keeps plans across calls in Python state, which torch.compile would "
                 "specialize on every call; use plan_every=1 with torch.compile (share_plan=True composes with it)")


class _Kept(threading.local):
    """Per thread: plans kept for reuse (scope → (plan, call number)), the call count of the current
    run, the previous call's timestep and its run's mark (RunSource.mark)."""

    def __init__(self):
        self.plans: Dict[tuple, Tuple[MergePlan, int]] = {}
        self.number = -1
        self.last_t: Optional[float] = None
        self.mark: Any = None

    def __reduce__(self):  # a copy keeps no plans
        return (_Kept, ())


class RunSource:
    """The pipeline a model was patched through (weakly; none for a bare model, or a copy of one): its
    scheduler tells sampling runs apart."""

    def __init__(self, pipeline: Any = None):
        self.ref = weakref.ref(pipeline) if pipeline is not None else None

    def __reduce__(self):  # a copy of the model is no longer the pipeline's
        return (RunSource, ())

    def mark(self) -> Any:
        """What changes exactly when a run starts: the `timesteps` tensor of the pipeline's scheduler now
        (set_timesteps makes a new one), or None without a pipeline."""
        pipeline = self.ref() if self.ref is not None else None
        return getattr(getattr(pipeline, "scheduler", None), "timesteps", None)


def fits(plan: MergePlan, request: MergeRequest) -> bool:
    """A plan made for another block or call serves this one if it maps the same tokens alike."""
    B, N, _ = request.metric.shape
    m = request.metric
    return tuple(plan.slot.shape) == (B, N) and plan.num_out == N - request.r and plan.slot.device == m.device


def with_context(plan: MergePlan, head: int = 0, tail: int = 0) -> MergePlan:
    """plan [B, N] → [B, head + N + tail]: the head and tail tokens (reference images before / after the
    image grid) each get an output row of their own after the plan's M (head first), so they pass through
    merge and unmerge unchanged (and are their own rows' anchors)."""
    B, N = plan.slot.shape
    M, extra = plan.num_out, head + tail
    rows = torch.arange(M, M + extra, device=plan.slot.device, dtype=plan.slot.dtype).expand(B, extra)
    slot = torch.cat([rows[:, :head], plan.slot, rows[:, head:]], dim=1)
    counts = torch.cat([plan.counts, plan.counts.new_ones(B, extra)], dim=1)
    offsets = members = None
    if plan.offsets is not None and plan.members is not None:
        steps = torch.arange(1, extra + 1, device=plan.offsets.device, dtype=plan.offsets.dtype)
        offsets = torch.cat([plan.offsets, plan.offsets[:, -1:] + steps], dim=1)
        positions = torch.cat([torch.arange(head), torch.arange(head + N, head + N + tail)]).to(plan.members)
        members = torch.cat([plan.members + head, positions.expand(B, extra)], dim=1)
    anchor = None
    if plan.anchor is not None:
        positions = torch.cat([torch.arange(head), torch.arange(head + N, head + N + tail)]).to(plan.anchor)
        anchor = torch.cat([plan.anchor + head, positions.expand(B, extra)], dim=1)
    return MergePlan(slot=slot, counts=counts, num_out=M + extra, offsets=offsets, members=members, anchor=anchor)


@torch.compiler.disable
def _timestep_value(timestep) -> Optional[float]:
    return None if timestep is None else float(torch.as_tensor(timestep).reshape(-1)[0].item())


class PlanProvider:
    """Builds, shares and reuses the plans of one patched model (see the module docstring). anchors:
    plans carry each output row's anchor token (MergePlan.anchor), for merged tokens whose positions
    must follow them (Flux's rotary embeddings in tokens mode)."""

    def __init__(self, config: ToMeConfig, anchors: bool = False):
        self.config = config
        self.anchors = anchors
        self.kept = _Kept()
        self.source = RunSource()
        self._hold()

    def watch(self, pipeline: Any) -> None:
        """Tell runs apart by `pipeline`'s scheduler (apply_patch given a pipeline)."""
        if hasattr(pipeline, "scheduler"):
            self.source = RunSource(pipeline)

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
        head, tail = request.head, request.tail
        metric = request.metric[:, head: request.metric.shape[1] - tail] if head or tail else request.metric
        dst_idx, src_idx = matching.partition(request.h, request.w, cfg.sx, cfg.sy, request.key, metric.device)
        window = None if cfg.match_window is None else matching.LocalWindow(request.h, request.w, cfg.sx, cfg.sy,
                                                                            cfg.match_window)
        plan = ops.build_plan(metric, dst_idx, src_idx, request.r, window)
        if self.anchors:
            plan = dataclasses.replace(plan, anchor=matching.anchors(plan, dst_idx))
        return with_context(plan, head, tail) if head or tail else plan

    def begin_call(self, ctx: CallContext) -> None:
        """A denoiser call starts on this thread (only plan_every > 1 counts calls)."""
        if self.config.plan_every == 1:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_ERROR)
        kept = self.kept
        t = _timestep_value(ctx.timestep)
        mark = self.source.mark()
        if (mark is not None and mark is not kept.mark) or (t is not None and kept.last_t is not None
                                                          and t > kept.last_t):
            self.drop()  # the scheduler was set up again, or the timestep went up: a new sampling run
        kept.last_t, kept.mark = t, mark
        kept.number += 1

    def drop(self) -> None:
        """Forget this thread's kept plans (a new run, or a call that did not finish)."""
        kept = self.kept
        kept.plans.clear()
        kept.number = -1
        kept.last_t = kept.mark = None

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
