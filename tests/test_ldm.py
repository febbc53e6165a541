"""LDM / sd-webui style models: `.model.diffusion_model` with blocks called as block(x, context), subclasses
of the block class included."""
import torch

import ldm_like
import tomesd
from tomesd.patch import patched_state


def _tokens_seen(unet, x, t, context):
    seen = []
    blocks = [m for m in unet.modules() if isinstance(m, ldm_like.BasicTransformerBlock)]

    def record(module, args):
        seen.append(args[0].shape[1])

    handles = [b.attn1.register_forward_pre_hook(record) for b in blocks]
    with torch.no_grad():
        out = unet(x, t, context)
    for h in handles:
        h.remove()
    return seen, out


def test_ldm_model_merges_top_level_and_unpatches_exactly():
    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion().eval()
    unet = model.model.diffusion_model
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 8)
    plain_seen, want = _tokens_seen(unet, x, t, context)
    assert plain_seen == [64, 16, 16, 64]
    assert tomesd.apply_patch(model, ratio=0.5) is model
    assert tomesd.is_patched(model) and tomesd.is_patched(unet)
    seen, out = _tokens_seen(unet, x, t, context)
    assert seen == [32, 16, 16, 32] and not torch.equal(out, want)
    tomesd.apply_patch(model, ratio=0.5, max_downsample=2)
    seen, _ = _tokens_seen(unet, x, t, context)
    assert seen == [32, 8, 8, 32]
    tomesd.remove_patch(model)
    assert not tomesd.is_patched(model)
    assert torch.equal(_tokens_seen(unet, x, t, context)[1], want)


def test_ldm_block_subclasses_are_patched():
    class HijackedBlock(ldm_like.BasicTransformerBlock):
        pass

    torch.manual_seed(0)
    model = ldm_like.LatentDiffusion().eval()
    for st in (m for m in model.modules() if isinstance(m, ldm_like.SpatialTransformer)):
        old = st.transformer_blocks[0]
        new = HijackedBlock(old.norm1.normalized_shape[0], old.attn2.to_k.in_features)
        new.load_state_dict(old.state_dict())
        st.transformer_blocks[0] = new
    tomesd.apply_patch(model, ratio=0.5)
    assert len(patched_state(model).host.blocks) == 4
