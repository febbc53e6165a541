"""kv mode: self-attention keeps queries for all N tokens and takes keys/values from the M merged
ones; the output keeps N rows, so nothing is unmerged. The host's attention says how keys and
values reach it (a key/value argument, or inside a joint attention's SDPA call)."""
from __future__ import annotations

from .base import Mode


class KVMode(Mode):
    name = "kv"

    def takes_all_tokens(self, call):
        # an attention that merges inside its SDPA call may be handed the text tokens too
        return not call.state.host.attention.kv_inside

    def enter(self, call, plan):
        attention = call.state.host.attention
        return attention.prepare(call, call.args, call.kwargs, plan, merge_kv=True, bias=self.prop)
