"""tokens mode (tomesd 0.1.3's): merge the sub-layer's input, run it on M tokens, unmerge its output."""
from __future__ import annotations

from ... import ops
from .base import Mode


class TokensMode(Mode):
    """x [B, N, C] → merged [B, M, C] in; the output [B, M, C] (or a joint attention's (image, text)
    pair) unmerged back to [B, N, C]. With prop, the host's attention biases the merged keys."""

    name = "tokens"

    def enter(self, call, plan):
        args, kwargs = call.with_input(ops.merge(call.x, plan))
        if not self.prop:
            return args, kwargs
        attention = call.state.host.attention
        return attention.prepare(call, args, kwargs, plan, merge_kv=False, bias=True)

    def exit(self, output, plan):
        if isinstance(output, tuple):  # a joint attention: (image tokens, text tokens)
            return (ops.unmerge(output[0], plan),) + output[1:]
        return ops.unmerge(output, plan)
