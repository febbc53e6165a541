"""kv mode: self-attention keeps queries for all N tokens and takes keys/values from the M merged
ones; the output keeps N rows, so nothing is unmerged. The host's attention says how keys and
values reach it (a key/value argument, or inside a joint attention's SDPA call) and whether each
block's attention can take them (`Attention.kv_refusal_of`). prop_attn left to follow the mode: on
where the attention takes an additive bias."""
from __future__ import annotations

from .base import Mode


class KVMode(Mode):
    name = "kv"

    @classmethod
    def prop_default(cls, config, attention):
        return config.merge_attn and attention.takes_bias

    @classmethod
    def refusals(cls, host, config):
        reasons = super().refusals(host, config)
        if not config.merge_attn or reasons:
            return reasons
        spec = host.sublayers[0]
        for index, block in enumerate(host.blocks):
            attn = host.sublayer_module(block, spec)
            why = host.attention.kv_refusal_of(attn) if attn is not None else None
            if why is not None:
                return [f"mode='kv' cannot run on {spec.name} of transformer block {index}: {why}"]
        return []

    @classmethod
    def notes(cls, host, config, prop_given):
        if config.merge_attn and not prop_given and not config.prop_attn:
            return [f"tomesd: prop_attn is off for {type(host.root).__name__} (its attention takes no additive bias); "
                    "kv mode runs without proportional attention"]
        return []

    def takes_all_tokens(self, call):
        # an attention that merges inside its SDPA call may be handed the text tokens too
        return not self.attention.kv_inside

    def refusal(self, call):
        return self.attention.refusal(call, merge_kv=True, bias=self.prop)

    def enter(self, call, plan):
        return self.attention.prepare(call, call.args, call.kwargs, plan, merge_kv=True, bias=self.prop)
