"""tokens mode (tomesd 0.1.3's, the default): merge the sub-layer's input, run it on M tokens, unmerge its
output. Cross-attention and feed-forward sub-layers always merge this way. A whole block (Sublayer kind
"block") merges its input and rebuilds each token after it from its own input and its row's change."""
from __future__ import annotations

import torch

from ... import ops
from ..hosts.base import ATTENTION_KINDS
from .base import Mode


class TokensMode(Mode):
    """x [B, N, C] → merged [B, M, C] in; the output [B, M, C] (or a joint attention's (image, text[,
    IP-Adapter image]) tuple) unmerged back to [B, N, C]. With prop, the attention biases the merged
    keys by log size; where it applies positions (Flux's rotary embeddings), each merged token takes
    its row's anchor's. prop_attn left to follow the mode: off (tomesd 0.1.3's results)."""

    name = "tokens"
    merges_inputs = True

    def refusal(self, call):
        if call.kind not in ATTENTION_KINDS:
            return None
        why = self.attention.tokens_refusal(call)
        if why is None and self.prop:
            why = self.attention.refusal(call, merge_kv=False, bias=True)
        return why

    def enter(self, call, plan):
        merged = ops.merge(call.x, plan)
        args, kwargs = call.with_input(merged)
        if call.kind == "block":
            call.kept = (call.x, merged)
        if call.kind not in ATTENTION_KINDS:
            return args, kwargs
        # the attention may apply positions (Flux's rotary embeddings) or take keys/values apart from its
        # input (ComfyUI's attn1 after an attn1_patch): it is asked even without prop_attn
        return self.attention.prepare(call, args, kwargs, plan, merge_kv=False, bias=self.prop)

    def exit(self, output, plan, kept=None):
        if kept is not None:
            return _rebuilt(output, plan, *kept)
        if isinstance(output, tuple):  # a joint attention: (image tokens, text tokens[, IP-Adapter image])
            return tuple(ops.unmerge(o, plan) if i == 0 or (i > 1 and _merged_tokens(o, plan)) else o
                         for i, o in enumerate(output))
        return ops.unmerge(output, plan)


def _merged_tokens(value, plan) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 3 and value.shape[1] == plan.num_out


def _rebuilt(output, plan, x, merged):
    """A whole residual block's output (its image tokens y [B, M, C], alone or last of a tuple) back on
    x's N tokens: each token's own input plus its row's change, x + unmerge(y − merge(x)), computed as
    unmerge(y) + (x − unmerge(merge(x))) so that a plan merging nothing gives y exactly. fp16 results are
    clipped to its range, as the block clips its own output."""
    image = output[-1] if isinstance(output, tuple) else output
    out = ops.unmerge(image, plan) + (x - ops.unmerge(merged, plan))
    if out.dtype == torch.float16:
        out = out.clip(-65504, 65504)
    return output[:-1] + (out,) if isinstance(output, tuple) else out
