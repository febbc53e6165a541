"""The shipped photos reference model (tomesd.reference.photos), CPU: data split, prompts, loading by
name, sampling at 32 / 64 / 128 px, determinism, the classifier on held-out crops, tomesd.quality on it.
The weights are the shipped ones (never retrained here); step counts are tiny."""
import json
import os

import pytest
import torch

import tomesd
from tomesd import quality
from tomesd.tools import models
from tomesd.reference import DigitsPipeline, classify
from tomesd.reference.photos import (
    CLASSES, HELD_OUT, PHOTO_CLASSIFIER_PATH, PHOTOS_DIR, SIZES, PhotoClassifier, PhotoCrops, PhotosPipeline,
    load_classifier, parse_photo,
)
from tomesd.reference.photos_train import held_out_set

pytest.importorskip("sklearn")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def pipe():
    return models.load_pipeline("photos")


@pytest.fixture(scope="module")
def crops():
    return PhotoCrops()


def test_loads_by_name_and_directory(pipe):
    assert isinstance(pipe, PhotosPipeline) and pipe.vae_scale_factor == 1
    config = pipe.unet.config
    assert (config.sample_size, config.in_channels, config.out_channels) == (32, 3, 3)
    assert pipe.class_embedding.config.num_classes == len(CLASSES) + 1
    assert type(models.load_pipeline(PHOTOS_DIR)) is PhotosPipeline  # a directory: recognized by its class name
    assert type(models.load_pipeline("reference")) is DigitsPipeline
    assert models.load_unet("photos").config.block_out_channels == config.block_out_channels
    assert models.model_problem("photos", "pipeline") == ""
    weights = os.path.join(PHOTOS_DIR, "unet", "diffusion_pytorch_model.safetensors")
    assert os.path.getsize(weights) <= 15e6


def test_finest_level_tokens(pipe):
    """Transformer blocks at 32×32 (1,024 tokens at 32 px) and 16×16: counted by hooks on a real call."""
    tokens = []
    hooks = [m.register_forward_hook(lambda m, a, kw, out: tokens.append(out[0].shape[1] if isinstance(out, tuple) else out.shape[1]),
                                     with_kwargs=True)
             for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    try:
        pipe(prompt="chelsea", num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(tokens)) == [256, 1024] and tokens.count(1024) == 3


def test_prompts():
    assert parse_photo("chelsea") == CLASSES.index("chelsea")
    assert parse_photo("a photo of the Hubble deep field") == CLASSES.index("hubble_deep_field")
    assert parse_photo(3) == 3
    for bad in ("a cat", "grass and gravel", len(CLASSES), True, "3"):
        with pytest.raises(ValueError, match="photos model draws one of"):
            parse_photo(bad)


def test_held_out_square_is_held_out(crops):
    """Training crops never overlap a photograph's held-out bottom-right square; held-out crops lie inside it."""
    g = torch.Generator().manual_seed(0)
    for c, photo in enumerate(crops.photos):
        h, w = photo.shape[1:]
        hy, hx = h - int(HELD_OUT * h), w - int(HELD_OUT * w)
        for _ in range(50):
            y, x = crops._corner(c, 48, g, held_out=False)
            assert y + 48 <= hy or x + 48 <= hx
            y, x = crops._corner(c, 48, g, held_out=True)
            assert y >= hy and x >= hx and y + 48 <= h and x + 48 <= w
    x, labels = crops.sample(24, torch.Generator().manual_seed(1))
    assert x.shape == (24, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert sorted(labels.tolist()) == sorted(list(range(len(CLASSES))) * 2)
    again, _ = crops.sample(24, torch.Generator().manual_seed(1))
    assert torch.equal(x, again)


def test_classifier_on_held_out_crops(crops):
    """The shipped classifier names the source photograph of held-out crops (issue 18: ≥ 90%)."""
    model = load_classifier()
    assert isinstance(model, PhotoClassifier) and os.path.isfile(PHOTO_CLASSIFIER_PATH)
    x, y = held_out_set(crops, seed=0)
    assert (classify(model, x) == y).float().mean().item() >= 0.9


@pytest.mark.parametrize("size", SIZES)
def test_samples_each_size(pipe, size):
    out = pipe(prompt=["rocket", "grass"], height=size, width=size, num_inference_steps=1, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, size, size, 3) and 0 <= out.min() and out.max() <= 1


def test_deterministic(pipe):
    def sample(seed):
        return pipe(prompt="coffee", num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


def test_patch_merges_and_removes(pipe):
    """ToMe on the 32×32 level: the output changes, and removing the patch restores it bit for bit."""
    def sample():
        return pipe(prompt="flower", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    base = sample()
    tomesd.apply_patch(pipe, ratio=0.5)
    try:
        merged = sample()
    finally:
        tomesd.remove_patch(pipe)
    assert not torch.equal(base, merged)
    assert torch.equal(base, sample())


def test_quality_tool_sizes(tmp_path, capsys):
    """python -m tomesd.quality --model photos --sizes 32,64: a table and results per size; accuracy
    (the classifier judges the model's own 32 px images) at 32 px only, and what it is said in one line."""
    out = tmp_path / "q"
    assert quality.main(["--model", "photos", "--prompt", "chelsea", "--prompt", "gravel", "--sizes", "32,64",
                         "--steps", "2", "--ratios", "0.5", "--warmup", "0", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "32×32 px" in printed.out and "64×64 px" in printed.out
    tables = printed.out.split("64×64 px")
    assert "accuracy" in tables[0].split("32×32 px")[1] and "accuracy" not in tables[1]
    assert "accuracy: how often the classifier reads the requested class" in printed.err
    assert "accuracy: left out at 64x64 px: the classifier judges the model's own 32 px images" in printed.err
    for size in (32, 64):
        with open(out / f"{size}px" / "results.json") as f:
            result = json.load(f)
        rows = result["rows"]
        assert [r["setting"] for r in rows][0] == "no ToMe" and len(rows) == 2
        assert all((r["accuracy"] is not None) == (size == 32) for r in rows)
        assert result["environment"]["config"]["height"] == size
        assert (out / f"{size}px" / "contact_sheet.png").is_file()


def test_quality_tool_errors():
    with pytest.raises(SystemExit):
        quality.main(["--model", "photos", "--prompt", "a cat"])
    with pytest.raises(SystemExit):
        quality.main(["--model", "photos", "--sizes", "32,64", "--height", "64"])
