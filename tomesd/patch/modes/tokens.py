"""tokens mode (tomesd 0.1.3's, the default): merge the sub-layer's input, run it on M tokens, unmerge its
output. Cross-attention and feed-forward sub-layers always merge this way."""
from __future__ import annotations

from ... import ops
from .base import Mode


class TokensMode(Mode):
    """x [B, N, C] → merged [B, M, C] in; the output [B, M, C] (or a joint attention's (image, text)
    pair) unmerged back to [B, N, C]. With prop, the attention biases the merged keys by log size.
    prop_attn left to follow the mode: off (tomesd 0.1.3's results)."""

    name = "tokens"

    def enter(self, call, plan):
        args, kwargs = call.with_input(ops.merge(call.x, plan))
        if call.kind != "self":
            return args, kwargs
        # the attention may take keys/values apart from its input (ComfyUI's attn1 after an attn1_patch)
        return self.attention.prepare(call, args, kwargs, plan, merge_kv=False, bias=self.prop)

    def exit(self, output, plan):
        if isinstance(output, tuple):  # a joint attention: (image tokens, text tokens)
            return (ops.unmerge(output[0], plan),) + output[1:]
        return ops.unmerge(output, plan)
