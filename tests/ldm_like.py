"""A tiny model shaped like CompVis LDM / sd-webui: LatentDiffusion.model.diffusion_model is an
openaimodel-style UNetModel whose SpatialTransformers hold BasicTransformerBlock(x, context)."""
import torch
import torch.utils.checkpoint
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim=None, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class CheckpointFunction(torch.autograd.Function):
    """CompVis' reentrant checkpoint (ldm.modules.diffusionmodules.util): forward without a graph,
    backward reruns `run_function` on detached views of the saved inputs."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        ctx.input_tensors = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            shallow_copies = [x.view_as(x) for x in ctx.input_tensors]
            output_tensors = ctx.run_function(*shallow_copies)
        grads = torch.autograd.grad(output_tensors, ctx.input_tensors + ctx.input_params, output_grads,
                                    allow_unused=True)
        del ctx.input_tensors, ctx.input_params, output_tensors
        return (None, None) + grads


def checkpoint(func, inputs, params, flag):
    """CompVis' util.checkpoint(func, inputs, params, flag)."""
    if flag:
        args = tuple(inputs) + tuple(params)
        return CheckpointFunction.apply(func, len(inputs), *args)
    return func(*inputs)


# How BasicTransformerBlock.forward runs _forward: "off" (a plain call, through CompVis' checkpoint with
# flag False), "compvis" (use_checkpoint=True), "webui" (sd-webui's hijack: torch's reentrant checkpoint),
# "non-reentrant" (torch's non-reentrant checkpoint).
CHECKPOINT = {"mode": "off"}


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.attn2 = CrossAttention(dim, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        mode = CHECKPOINT["mode"]
        if mode in ("webui", "non-reentrant"):
            return torch.utils.checkpoint.checkpoint(self._forward, x, context, use_reentrant=mode == "webui")
        return checkpoint(self._forward, (x, context), self.parameters(), mode == "compvis")

    def _forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(4, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            x = layer(x, context) if isinstance(layer, SpatialTransformer) else layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, dim=16, context_dim=8):
        super().__init__()
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(4, dim, 3, padding=1)),
            TimestepEmbedSequential(SpatialTransformer(dim, context_dim)),
            TimestepEmbedSequential(Downsample(dim)),
            TimestepEmbedSequential(SpatialTransformer(dim, context_dim)),
        ])
        self.middle_block = TimestepEmbedSequential(SpatialTransformer(dim, context_dim))
        self.output_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Upsample(scale_factor=2)),
            TimestepEmbedSequential(SpatialTransformer(dim, context_dim)),
        ])
        self.out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None):
        h = x
        for block in self.input_blocks:
            h = block(h, None, context)
        h = self.middle_block(h, None, context)
        for block in self.output_blocks:
            h = block(h, None, context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = UNetModel()


class LatentDiffusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = DiffusionWrapper()
