"""The Mode interface: how a sub-layer runs on merged tokens."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from ...matching import MergePlan
from ..frames import SublayerCall

if TYPE_CHECKING:  # pragma: no cover
    from ...config import ToMeConfig
    from ..hosts.base import Attention, Host


class Mode:
    """How a sub-layer runs on merged tokens: a strategy chosen once per sub-layer when patching, acting
    through the host's self-attention `attention` it was made with.

    A mode module says everything about its mode: `name` (what `apply_patch(mode=...)` takes),
    `prop_default` (prop_attn when left to follow the mode), `refusals` (why a model cannot run it),
    `notes` (what patching logs about it) and, at run time, `enter(call, plan)` → the sub-layer's new
    (args, kwargs) — merging its input, or asking the attention for merged keys/values — and
    `exit(output, plan)` → its output as the block expects it (N tokens), or None to leave it.
    `takes_all_tokens(call)`: whether the sub-layer's input must be the block's N tokens.
    `refusal(call)`: why this call cannot run in the mode (the sub-layer is then left unmerged, said), or None.
    prop: proportional attention (a merged key standing for s tokens gets + log s on its logits).
    """

    name = ""

    def __init__(self, attention: "Attention", prop: bool = False):
        self.attention, self.prop = attention, prop

    @classmethod
    def prop_default(cls, config: "ToMeConfig", attention: "Attention") -> bool:
        """prop_attn for `config` when it was left to follow the mode (None)."""
        return False

    @classmethod
    def refusals(cls, host: "Host", config: "ToMeConfig") -> List[str]:
        """Why this mode cannot run in host's self-attention (checked when patching; [] if it can). A host
        states what rules a mode out in `Host.mode_refusals`."""
        why = host.mode_refusals.get(cls.name)
        if why is None or not config.merge_attn:
            return []
        return [f"mode='{cls.name}' cannot merge the attention of {type(host.root).__name__}: {why}"]

    @classmethod
    def notes(cls, host: "Host", config: "ToMeConfig", prop_given: bool) -> List[str]:
        """What patching `host` with `config` in this mode logs at INFO ([] if nothing)."""
        return []

    def takes_all_tokens(self, call: SublayerCall) -> bool:
        return True

    def refusal(self, call: SublayerCall) -> Optional[str]:
        return None

    def enter(self, call: SublayerCall, plan: MergePlan) -> Tuple[tuple, dict]:
        raise NotImplementedError

    def exit(self, output, plan: MergePlan) -> Optional[Any]:
        return None
