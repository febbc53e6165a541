"""The shipped photos-sdxl and photos-flux reference models (issue 28), CPU: loading by name and by
directory, their layouts (SDXL's levels and token counts, Flux's packing and img_ids), one sampling
step at every canvas size, tomesd patching them (and removing the patch bit for bit), their
training objectives against an oracle, a couple of training steps through train.py, the classifier
that judges them, and the tools that load them by name. Weights are the shipped ones; step counts are tiny."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import tomesd
from tomesd import quality
from tomesd.tools import models
from tomesd.patch import patched_state
from tomesd.reference import classify, photos_flux, photos_sdxl, photos_sheet, train
from tomesd.reference.photos import CLASSES, PhotoCrops
from tomesd.reference.photos import load_classifier as load_photos_classifier
from tomesd.reference.photos_flux import PhotosFluxPipeline, image_ids, pack, shift_mu, unpack
from tomesd.reference.photos_sdxl import HalfScale, PhotosSDXLPipeline
from tomesd.reference import photos_train
from tomesd.reference.photos_train import held_out_set

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

MODULES = {"photos-sdxl": photos_sdxl, "photos-flux": photos_flux}
CLASSES_OF = {"photos-sdxl": PhotosSDXLPipeline, "photos-flux": PhotosFluxPipeline}
DIRS = {"photos-sdxl": photos_sdxl.SDXL_DIR, "photos-flux": photos_flux.FLUX_DIR}
MULTIPLE = {"photos-sdxl": 4, "photos-flux": 2}  # two downsamplings; the 2×2 packing


class Pipes(dict):
    """name → the shipped pipeline, loaded on first use."""

    def __missing__(self, name):
        self[name] = models.load_pipeline(name)
        return self[name]


@pytest.fixture(scope="module")
def pipes():
    return Pipes()


def denoiser(pipe):
    return getattr(pipe, pipe.denoiser_name)


def sample(pipe, size, steps=2, seed=0, prompt="flower", **kwargs):
    return pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


@pytest.mark.parametrize("name", MODULES)
def test_loads_by_name_and_directory(pipes, name):
    pipe = pipes[name]
    assert type(pipe) is CLASSES_OF[name] and pipe.vae_scale_factor == 1
    assert models.reference_dir(name) == DIRS[name] and models.model_problem(name, "pipeline") == ""
    assert models.reference_pipeline_class(name) is CLASSES_OF[name]
    assert type(models.load_pipeline(DIRS[name])) is CLASSES_OF[name]  # a directory: recognized by its class name
    assert models.is_class_pipeline(pipe) and models.pipeline_size(pipe) == MODULES[name].SIZE
    assert models.size_multiple(pipe) == MULTIPLE[name]
    assert models.size_problem(pipe, MULTIPLE[name] + 1, 64) != ""
    assert pipe.class_embedding.config.num_classes == len(CLASSES) + 1
    weights = os.path.join(DIRS[name], pipe.denoiser_name, "diffusion_pytorch_model.safetensors")
    assert os.path.getsize(weights) <= 15e6
    assert not any(p.requires_grad for p in denoiser(pipe).parameters()) and not denoiser(pipe).training


def test_sdxl_layout(pipes):
    """SDXL's layout: no attention at /1, 2 transformer layers per block at /2 (1,024 tokens at 64 px), 4 at /4 and
    in the mid block (256 tokens), linear projections, text_time added conditioning: counted by hooks on a real call."""
    unet = pipes["photos-sdxl"].unet
    config = unet.config
    assert config.down_block_types[0] == "DownBlock2D" and config.up_block_types[-1] == "UpBlock2D"
    assert tuple(config.transformer_layers_per_block)[1:] == (2, 4) and config.use_linear_projection
    assert config.addition_embed_type == "text_time"
    assert not hasattr(unet.down_blocks[0], "attentions")
    tokens = []
    hooks = [m.register_forward_hook(lambda m, a, out: tokens.append(out.shape[1] if torch.is_tensor(out) else out[0].shape[1]))
             for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    try:
        sample(pipes["photos-sdxl"], 64, steps=1, guidance_scale=1.0)
    finally:
        for h in hooks:
            h.remove()
    assert tokens.count(1024) == 2 * (1 + 2) and tokens.count(256) == 4 * (1 + 1 + 2) and len(tokens) == 22


def test_sdxl_added_conditioning_matters(pipes):
    """time_ids reach the UNet: another original side gives another prediction (training crops: 40-96 px)."""
    pipe = pipes["photos-sdxl"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cond = pipe.class_embedding(torch.tensor([1]))
    t = torch.tensor([500])
    default = pipe.predict(x, t, cond)
    assert torch.equal(default, pipe.predict(x, t, cond, torch.tensor([photos_sdxl.ORIGINAL_SIDE])))
    assert not torch.allclose(default, pipe.predict(x, t, cond, torch.tensor([96])))


def test_flux_packing_as_flux_pipeline():
    """pack: token (i, j) is the 2×2 patch at rows 2i..2i+1, columns 2j..2j+1, channels then dy, dx (diffusers'
    FluxPipeline._pack_latents); unpack inverts it; img_ids are the (0, row, column) grid tomesd's Flux host reads."""
    from tomesd.patch.hosts.mmdit import ids_layout

    x = torch.randn(2, 3, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 12)
    for i in range(3):
        for j in range(4):
            assert torch.equal(tokens[:, i * 4 + j], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 12))
    assert torch.equal(unpack(tokens, 6, 8), x)
    ids = image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0]
    assert ids_layout(ids) == (3, 4, 0, 0)  # (h, w, head, tail): no reference tokens
    assert image_ids(128, 128).shape[0] == 4096  # the largest canvas: 4k image tokens


def test_flux_layout_and_shift(pipes):
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    transformer = pipes["photos-flux"].transformer
    assert type(transformer) is FluxTransformer2DModel and transformer.config.in_channels == 12
    kinds = [type(m) for m in transformer.modules() if isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock))]
    assert kinds.count(FluxTransformerBlock) == 2 and kinds.count(FluxSingleTransformerBlock) == 4
    config = pipes["photos-flux"].scheduler.config
    assert shift_mu(256, config) == pytest.approx(0.5) and shift_mu(4096, config) == pytest.approx(1.15)


@pytest.mark.parametrize("name,size", [(n, s) for n in MODULES for s in MODULES[n].SIZES])
def test_one_step_each_size(pipes, name, size, request):
    """One guided step at 1×, 2× and 4× the training side (the largest: 16,384 tokens at SDXL's /2 and 4,096 packed
    Flux tokens, seconds to a minute on a CPU: slow)."""
    if size == 4 * MODULES[name].SIZE:
        request.applymarker(pytest.mark.slow)
    out = pipes[name](prompt="rocket", height=size, width=size, num_inference_steps=1,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, size, size, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01


@pytest.mark.parametrize("name", MODULES)
def test_deterministic_and_guided(pipes, name):
    pipe, size = pipes[name], MODULES[name].SIZE
    first = sample(pipe, size, seed=0)
    assert torch.equal(first, sample(pipe, size, seed=0))
    assert not torch.equal(first, sample(pipe, size, seed=1))
    assert not torch.equal(first, sample(pipe, size, seed=0, guidance_scale=1.0))
    assert not torch.equal(first, sample(pipe, size, seed=0, prompt="gravel"))


@pytest.mark.parametrize("name", MODULES)
def test_patch_merges_and_removes(pipes, name, recorded_plans):
    """apply_patch(pipe, ratio=0.5) merges at the finest attention level (SDXL: /2, 1,024 tokens at 64 px; Flux: the
    256 packed tokens at 32 px, kv mode), changes the output, and remove_patch restores it bit for bit."""
    pipe, size = pipes[name], MODULES[name].SIZE
    base = sample(pipe, size)
    tomesd.apply_patch(pipe, ratio=0.5)
    try:
        assert tomesd.is_patched(pipe)
        merged = sample(pipe, size)
    finally:
        tomesd.remove_patch(pipe)
    tokens = {metric.shape[1] for metric, *_ in recorded_plans}
    assert tokens == ({1024} if name == "photos-sdxl" else {256})
    assert {r for *_, r, _, _ in recorded_plans} == {min(tokens) // 2}
    # changed, not destroyed (images in [-1, 1]; photos-flux at 0.5 moves ~0.3 on average, by thread count's rounding)
    assert not torch.equal(base, merged) and (base - merged).abs().mean() < 0.5
    assert torch.equal(base, sample(pipe, size))


def test_flux_patch_is_kv_by_default_and_takes_tokens_mode(pipes):
    """The Flux host takes it: every double- and single-stream block, kv mode by default; tokens mode (merged
    tokens at their anchors' rotary positions) merges too, and removal gives the unpatched samples back."""
    pipe = pipes["photos-flux"]
    base = sample(pipe, 32)
    for mode in (None, "tokens"):
        tomesd.apply_patch(pipe, ratio=0.5, **({} if mode is None else dict(mode=mode)))
        try:
            state = patched_state(pipe)
            assert state.host.name == "flux" and state.config.mode == (mode or "kv") and len(state.host.blocks) == 6
            assert not torch.equal(sample(pipe, 32), base)
        finally:
            tomesd.remove_patch(pipe)
    assert torch.equal(sample(pipe, 32), base)


def _oracle(pipe, monkeypatch):
    """Replace pipe.predict by one that records its inputs and returns what `answer` says (set by the test)."""
    seen = {}

    def predict(x, t, cond, *extra):
        seen.update(x=x, t=t, cond=cond, extra=extra)
        return seen["answer"](x, t)

    monkeypatch.setattr(pipe, "predict", predict)
    return seen


def test_sdxl_training_loss(pipes, monkeypatch):
    """Epsilon prediction: x_t = sqrt(a)·x0 + sqrt(1 − a)·noise at t, then noise drawn from g; the crop sides reach
    predict as time_ids' original size; the loss is 0 for the true noise only."""
    pipe = pipes["photos-sdxl"]
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    sides = torch.tensor([40, 96])
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    seen = _oracle(pipe, monkeypatch)
    seen["answer"] = lambda x, t_: noise
    assert pipe.training_loss(x0, torch.tensor([1, 2]), torch.Generator().manual_seed(3), sides).item() == 0.0
    assert torch.equal(seen["t"], t) and torch.equal(seen["extra"][0], sides)
    assert torch.allclose(seen["x"], a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    seen["answer"] = lambda x, t_: torch.zeros_like(x)
    assert pipe.training_loss(x0, torch.tensor([1, 2]), torch.Generator().manual_seed(3), sides).item() > 0.5


def test_flux_training_loss(pipes, monkeypatch):
    """Rectified flow: t = sigmoid(N(0, 1)), then noise, from g; x_t = (1 − t)·x0 + t·noise packed; the target is
    noise − x0 packed, so the loss is 0 for the true velocity only."""
    pipe = pipes["photos-flux"]
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(3)
    t = torch.sigmoid(torch.randn(2, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    seen = _oracle(pipe, monkeypatch)
    seen["answer"] = lambda x, t_: pack(noise - x0)
    assert pipe.training_loss(x0, torch.tensor([1, 2]), torch.Generator().manual_seed(3)).item() == 0.0
    s = t.view(-1, 1, 1, 1)
    assert torch.equal(seen["t"], t) and seen["extra"][0].shape == (16, 3)
    assert torch.allclose(unpack(seen["x"], 8, 8), (1 - s) * x0 + s * noise, atol=1e-6)
    seen["answer"] = lambda x, t_: pack(noise)
    assert pipe.training_loss(x0, torch.tensor([1, 2]), torch.Generator().manual_seed(3)).item() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_train_two_steps(tmp_path, name):
    """python -m tomesd.reference.train --model NAME on a tiny schedule: the EMA pipeline is saved, loads by its class
    name, and differs from the untrained one; the log holds the reused classifier's held-out accuracy."""
    out, log = tmp_path / "model", tmp_path / "train.log"
    assert train.main(["--model", name, "--steps", "2", "--batch", "2", "--eval-every", "2", "--eval-samples", "1",
                       "--out", str(out), "--log", str(log)]) == 0
    text = log.read_text()
    assert "not retrained: held-out accuracy 0.9" in text and "done: 2 steps" in text
    trained = models.load_pipeline(str(out))
    assert type(trained) is CLASSES_OF[name]
    fresh = MODULES[name].new_pipeline(0)
    a, b = denoiser(trained).state_dict(), denoiser(fresh).state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_stop_at_keeps_the_schedule(tmp_path):
    """--stop-at 2 of a 4-step schedule gives the weights a run stopped there by its time guard would: step 2 of
    the same schedule (the learning rate at step 2 as in a 4-step run), saved and evaluated; photos-flux's defaults
    stop the shipped run where its guard stopped it."""
    out, log = tmp_path / "model", tmp_path / "train.log"
    assert train.main(["--model", "photos-flux", "--steps", "4", "--stop-at", "2", "--batch", "2", "--warmup", "1",
                       "--eval-every", "50", "--eval-samples", "1", "--out", str(out), "--log", str(log)]) == 0
    text = log.read_text()
    assert "stopping at step 2: --stop-at" in text and "done: 2 steps" in text and "step 2: saved EMA weights" in text
    assert photos_train.MODELS["photos-flux"][0]["stop_at"] == 1261


def test_train_refuses_unknown_model(capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "photos-xl"])
    err = capsys.readouterr().err
    assert "--model" in err and "photos-sdxl" in err and "photos-flux" in err


def test_classifiers_on_tiny_fixture(pipes):
    """Two held-out crops per photograph: the photos classifier reads the 32 px ones (photos-flux's size), and at half
    scale the 64 px ones (photos-sdxl's) as it reads their 32 px downsampling; a grey image is not every class."""
    photos = PhotoCrops().photos
    flux_judge, sdxl_judge = pipes["photos-flux"].reference_classifier(), pipes["photos-sdxl"].reference_classifier()
    assert isinstance(sdxl_judge, HalfScale) and type(flux_judge) is type(load_photos_classifier())
    x32, y = PhotoCrops(photos, size=32).sample(24, torch.Generator().manual_seed(7), held_out=True)
    x64, y64 = PhotoCrops(photos, size=64).sample(24, torch.Generator().manual_seed(7), held_out=True)
    assert torch.equal(y, y64)
    assert (classify(flux_judge, x32) == y).float().mean() >= 0.8
    assert (classify(sdxl_judge, x64) == y).float().mean() >= 0.8
    half = F.interpolate(x64, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(classify(sdxl_judge, x64), classify(flux_judge, half))
    assert len(set(classify(sdxl_judge, torch.zeros(12, 3, 64, 64)).tolist())) == 1


def test_held_out_set_at_each_size():
    """The held-out crops at 64 px are the 32 px ones' squares at twice the pixels (the same draws)."""
    x32, y32 = held_out_set(PhotoCrops(size=32), 0)
    x64, y64 = held_out_set(PhotoCrops(size=64), 0)
    assert torch.equal(y32, y64) and x64.shape[-1] == 64
    half = F.interpolate(x64[:50], scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    assert (half - x32[:50]).abs().mean() < 0.05


@pytest.mark.parametrize("name", MODULES)
def test_quality_tool(tmp_path, name):
    """python -m tomesd.quality --model NAME: a table with classifier accuracy, at the model's training size."""
    out = tmp_path / "q"
    size = MODULES[name].SIZE
    assert quality.main(["--model", name, "--prompt", "chelsea", "--prompt", "gravel", "--sizes", str(size), "--steps", "2",
                         "--ratios", "0.5", "--warmup", "0", "--no-progress", "--out", str(out)]) == 0
    with open(out / f"{size}px" / "results.json") as f:
        rows = json.load(f)["rows"]
    assert [r["setting"] for r in rows] == ["no ToMe", "r0.5"] and all(r["accuracy"] is not None for r in rows)
    assert rows[1]["psnr"] < 200 and rows[0]["identical"]


def test_sheet(tmp_path, capsys):
    """photos_sheet --model photos-flux: one row of held-out crops and one per size, read by the classifier."""
    out = tmp_path / "sheet.png"
    assert photos_sheet.main(["--model", "photos-flux", "--sizes", "32", "--steps", "2", "--out", str(out), "--tile", "32"]) == 0
    assert "32 px: classifier names" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).size == (len(CLASSES) * 34, photos_sheet.LABEL_H + 2 * (32 + photos_sheet.LABEL_H))
    with pytest.raises(SystemExit):
        photos_sheet.main(["--model", "photos-flux", "--sizes", "32,big"])
    assert "argument --sizes" in capsys.readouterr().err
