"""What a mode sees of one sub-layer call, and the Mode interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Tuple

from torch import Tensor, nn

from ...matching import MergePlan
from ..args import set_arg

if TYPE_CHECKING:  # pragma: no cover
    from ..state import BlockCall, ModelState


@dataclass
class SublayerCall:
    """One call of a merged sub-layer: its module and arguments, and its input tokens x [B, N, C]
    (found at `where` among the arguments: a position or a keyword). kind: the Sublayer kind."""

    state: "ModelState"
    block: "BlockCall"
    name: str
    kind: str
    module: nn.Module
    args: tuple
    kwargs: dict
    x: Tensor
    where: Any

    def with_input(self, value: Tensor) -> Tuple[tuple, dict]:
        """The call's (args, kwargs) with its input tokens replaced by value."""
        return set_arg(self.args, self.kwargs, self.where, value)


class Mode:
    """How a sub-layer runs on merged tokens: a strategy chosen once per sub-layer when patching.

    enter(call, plan) → the sub-layer's new (args, kwargs); exit(output, plan) → its output as the
    block expects it (N tokens), or None to leave it. prop: proportional attention (a merged key
    standing for s tokens gets + log s on its logits), asked of the host's attention at `enter`.
    takes_all_tokens(call): whether the mode needs the sub-layer's input to be the block's N tokens.
    """

    name = ""

    def __init__(self, prop: bool = False):
        self.prop = prop

    def takes_all_tokens(self, call: SublayerCall) -> bool:
        return True

    def enter(self, call: SublayerCall, plan: MergePlan) -> Tuple[tuple, dict]:
        raise NotImplementedError

    def exit(self, output, plan: MergePlan) -> Optional[Any]:
        return None
