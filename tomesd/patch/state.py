"""Typed state of one patched model (ModelState), and what needs it: logging once, the blocks a patch
owns, the threads inside its calls.

The model-level state holds only the configuration, the host, the modes and the hook handles. What
describes one denoiser call (latent size, random key, resolved ratios, plans) lives in a CallContext
(frames.py) on a stack local to the calling thread (`Calls`), so two threads never share one and a call
interrupted half-way leaves nothing that the next call uses.
"""
from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch._dynamo.comptime import comptime
from torch import nn

from ..config import ToMeConfig
from ..matching import MergePlan
from .frames import BlockCall, Calls, CallContext

if TYPE_CHECKING:  # pragma: no cover
    from .hosts.base import Host
    from .modes import Mode
    from .plans import PlanProvider

logger = logging.getLogger("tomesd")

STATE_ATTR = "_tomesd"


@dataclass
class ModelState:
    """One patched model: configuration, host, modes and hook handles. Per-call state lives in
    CallContexts (`calls`).

    live: calls with gradients whose autograd graph is alive (weak; the graph holds them).
    running: threads with an eager call in progress (apply / remove from another thread is refused then).
    observers: callables `observe(index, plan, request)` told of every plan a block merges with, when
    it is provided (the seam tools such as tomesd.visualize.MergeRecorder record merges through).
    modes: sub-layer name → the Mode merging there. plans: where block plans come from.
    """

    config: ToMeConfig
    host: "Host"
    max_downsample: int
    base_key: int
    sample_pos: Optional[int] = 0
    timestep_pos: Optional[int] = 1
    handles: List[Any] = field(default_factory=list)
    calls: Calls = field(default_factory=Calls)
    live: "weakref.WeakValueDictionary[int, CallContext]" = field(default_factory=weakref.WeakValueDictionary)
    ids: Any = field(default_factory=itertools.count)
    lock: Any = field(default_factory=threading.Lock)
    warned: "Tags" = field(default_factory=lambda: Tags())
    active: bool = True
    modes: Dict[str, "Mode"] = field(default_factory=dict)
    plans: Optional["PlanProvider"] = None
    running: Dict[int, bool] = field(default_factory=dict)
    observers: List[Any] = field(default_factory=list)

    @property
    def frames(self) -> List[Optional[CallContext]]:
        """This thread's stack of open calls of the model."""
        return self.calls.frames

    def current(self) -> Optional[CallContext]:
        """This thread's innermost open call (None outside a call, or in one that merges nothing)."""
        frames = self.calls.frames
        return frames[-1] if frames else None

    def block(self) -> Optional[BlockCall]:
        """The BlockCall of the block running in this thread's current call, if any."""
        ctx = self.current()
        return None if ctx is None else ctx.block

    def warn_once(self, tag: str, message: str) -> None:
        log_once(self, tag, message, logging.WARNING)

    # A copy (copy.deepcopy, pickle, torch.save of a patched model) is patched alike: its hooks hold a
    # copy of this state, with no open or live call, new locks, and its own blocks claimed.
    _FRESH = ("calls", "live", "ids", "lock", "running", "observers")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._FRESH}

    def __setstate__(self, values):
        self.__dict__.update(values)
        self.calls, self.live = Calls(), weakref.WeakValueDictionary()
        self.ids, self.lock, self.running, self.observers = itertools.count(), threading.Lock(), {}, []
        if self.active:
            for block in self.host.blocks:
                claim(block, self)


@torch.compiler.disable
def call_started(state: ModelState) -> None:
    """An eager call of the model starts on this thread (compiled calls are not tracked)."""
    with state.lock:
        state.running[threading.get_ident()] = True


@torch.compiler.disable
def call_ended(state: ModelState) -> None:
    with state.lock:
        state.running.pop(threading.get_ident(), None)


def check_idle(state: ModelState, action: str) -> None:
    """Refuse to change a model's hooks while another live thread is inside one of its calls: a call must
    see one configuration from its start to its end."""
    alive = {t.ident for t in threading.enumerate()}
    with state.lock:
        busy = [i for i in state.running if i != threading.get_ident() and i in alive]
    if busy:
        raise RuntimeError(f"tomesd: {action} while {len(busy)} call(s) of {type(state.host.root).__name__} are "
                           "running in other threads; a call must see one configuration from start to end. "
                           "Wait for those calls to finish (e.g. join their threads) first")


class Tags(set):
    """The tags a model has logged. Registered under `key` so that a logging call reordered out of a
    compiled graph (which may only carry constants) finds them; a copy gets its own key."""

    def __init__(self, items=()):
        super().__init__(items)
        self.key = next(_TAG_KEYS)
        _TAGS[self.key] = self

    def __reduce__(self):
        return (Tags, (list(self),))


_TAG_KEYS = itertools.count()
_TAGS: "weakref.WeakValueDictionary[int, Tags]" = weakref.WeakValueDictionary()


def _log_tagged(key: int, tag: str, message: str, level: int) -> None:
    """Log message unless the Tags registered under key hold tag."""
    tags = _TAGS.get(key)
    if tags is not None and tag not in tags:
        tags.add(tag)
        logger.log(level, message)


def _log_while_tracing(ctx) -> None:
    """A comptime callback: log_once's message, logged while dynamo traces the call (its locals are
    constants there)."""
    _log_tagged(*(ctx.get_local(name).as_python_constant() for name in ("key", "tag", "message", "level")))


def log_once(state: ModelState, tag: str, message: str, level: int) -> None:
    """Log `message` the first time `tag` is seen on this model. Compiled code logs it when the call is
    traced (dynamo's comptime), so tracing neither breaks the graph (fullgraph=True holds) nor guards on
    what has been logged (no recompile once it has)."""
    key = state.warned.key
    if torch.compiler.is_dynamo_compiling():  # not non-strict torch.export, which runs this as Python
        comptime(_log_while_tracing)
    elif tag not in state.warned:
        _log_tagged(key, tag, message, level)


def take_slot(state: ModelState, name: str) -> Optional[Tuple[Any, int]]:
    """(what sub-layer `name` of the block running now in this thread left for its processor, the
    block's index), taken out of the slot; None if it left nothing."""
    block = state.block()
    value = block.slots.pop(name, None) if block is not None else None
    return None if value is None else (value, block.index)


def current_plan(state: ModelState, index: int) -> Optional[MergePlan]:
    """The plan block `index` merges with in this thread's current call (None if not built)."""
    block = state.block()
    return None if block is None or block.index != index else block.plan


# Blocks patched by some model's state (one patch per block).
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, ModelState]" = weakref.WeakKeyDictionary()


def owner(block: nn.Module) -> Optional[ModelState]:
    """The state of the patch that merges in `block`, if any."""
    state = _OWNERS.get(block)
    return state if state is not None and state.active else None


def claim(block: nn.Module, state: ModelState) -> None:
    _OWNERS[block] = state


def release(block: nn.Module, state: ModelState) -> None:
    if _OWNERS.get(block) is state:
        del _OWNERS[block]
