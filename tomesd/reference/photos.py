"""A second reference model, on photographs: 1,024 tokens at its finest level at 32 px, 16,384 at 128 px.

The digits model's finest level has 256 tokens of upsampled 8×8 images. This one is trained on
random crops of the natural photographs shipped in scikit-image's and scikit-learn's wheels (nothing
is downloaded); the class is the source photograph (`CLASSES`).

- Data (`PhotoCrops`): each photograph resized so its short side is `SHORT_SIDE` px, RGB in [-1, 1]
  (grey ones repeated on three channels). The bottom-right `HELD_OUT` × `HELD_OUT` fraction of each
  photograph is held out: training crops never overlap it, evaluation crops lie inside it. A crop is
  a random square of side `CROP_SIDES` px (a random scale, so it holds structure, not just pixels),
  resized to 32×32 with antialiasing and flipped left-right at random.
- `PhotosPipeline`: the digits pipeline's sampler with photo classes: prompt "chelsea" | "a photo
  of rocket" | class_labels=[1, 3]. Pixel space RGB, UNet transformer blocks at 32×32 (one down, two
  up: 1,024 tokens each at 32 px) and at 16×16 (down, mid, up). The UNet is convolutional, so it
  samples larger canvases of the same photograph's texture and structure: height = width = 64 or 128
  give 4,096 or 16,384 tokens at the finest level (SD 1.5 has 4,096 at 512 px, 16,384 at 1,024 px).
- `PhotoClassifier`: [B, 3, H, W] in [-1, 1] → [B, len(CLASSES)] logits, any H, W ≥ 8 (global pooling),
  trained on training-region crops, judged on held-out crops.

Trained by `python -m tomesd.reference.train --model photos` (deterministic, log in `photos_train.log`).
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import DDIMScheduler, UNet2DConditionModel

from . import HERE, UNET_CONFIG as DIGITS_UNET_CONFIG, ClassEmbedding, DigitsPipeline

PHOTOS_DIR = os.path.join(HERE, "photos")
PHOTO_CLASSIFIER_PATH = os.path.join(HERE, "photos_classifier.safetensors")
PHOTOS_LOG = os.path.join(HERE, "photos_train.log")
SIZE = 32
SIZES = (32, 64, 128)  # canvases the quality tool samples: 1,024 / 4,096 / 16,384 finest-level tokens
# (name, source): skimage.data.<name>() or sklearn's load_sample_image(<name>.jpg)
SOURCES = (
    ("astronaut", "skimage"), ("chelsea", "skimage"), ("coffee", "skimage"), ("rocket", "skimage"),
    ("motorcycle", "skimage"), ("hubble_deep_field", "skimage"), ("retina", "skimage"), ("brick", "skimage"),
    ("grass", "skimage"), ("gravel", "skimage"), ("china", "sklearn"), ("flower", "sklearn"),
)
CLASSES = tuple(name for name, _ in SOURCES)
NULL_CLASS = len(CLASSES)  # the unconditional "class" for classifier-free guidance
TOKENS = 4
CROSS_DIM = 64
SHORT_SIDE = 192
HELD_OUT = 0.4  # side of the held-out bottom-right square, as a fraction of each side
CROP_SIDES = (40, 96)  # crop side in px before resizing to SIZE (held-out crops: at most the held-out square)

# the digits UNet's layout (two CrossAttn levels, one layer each, 1 and 2 heads, norm groups of 8), wider, RGB, 32 px
UNET_CONFIG = dict(DIGITS_UNET_CONFIG, sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(48, 96))


def _load_source(name: str, source: str) -> torch.Tensor:
    """One photograph as float [3, H, W] in [0, 1], as shipped (retina: the disc's inscribed square)."""
    if source == "sklearn":
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the photos model needs scikit-learn's sample images: pip install scikit-learn") from e
        array = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    x = torch.tensor(array, dtype=torch.float32) / 255.0
    x = x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x[..., :3].permute(2, 0, 1)
    if name == "retina":  # black outside the disc: keep the central square inside it
        h, w = x.shape[1:]
        m = int(0.18 * min(h, w))
        x = x[:, m:h - m, m:w - m]
    return x.contiguous()


def load_photos() -> List[torch.Tensor]:
    """The photographs of CLASSES, each [3, H, W] in [-1, 1] with min(H, W) = SHORT_SIDE."""
    photos = []
    for name, source in SOURCES:
        x = _load_source(name, source)
        h, w = x.shape[1:]
        scale = SHORT_SIDE / min(h, w)
        size = (round(h * scale), round(w * scale))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        photos.append(x.clamp(0, 1) * 2 - 1)
    return photos


class PhotoCrops:
    """Random square crops of the photographs, [n, 3, SIZE, SIZE] in [-1, 1], with their classes.

    sample(n, g, held_out=False): n crops, classes round-robin from a random start; training crops
    (held_out=False) never overlap a photograph's held-out bottom-right square, held-out crops lie
    inside it. Draws only from `g`, so a seeded generator gives the same crops on every run.
    """

    def __init__(self, photos: Optional[List[torch.Tensor]] = None, size: int = SIZE):
        self.photos = photos if photos is not None else load_photos()
        self.size = size

    def _corner(self, c: int, side: int, g: torch.Generator, held_out: bool) -> Tuple[int, int]:
        """Top-left (y, x) of one crop of photograph c: inside (held_out) or clear of its held-out square."""
        h, w = self.photos[c].shape[1:]
        hy, hx = h - int(HELD_OUT * h), w - int(HELD_OUT * w)  # the held-out square starts here
        if held_out:
            y = hy + int(torch.randint(0, h - hy - side + 1, (1,), generator=g))
            x = hx + int(torch.randint(0, w - hx - side + 1, (1,), generator=g))
            return y, x
        while True:  # rejection: most positions are clear of the square
            y = int(torch.randint(0, h - side + 1, (1,), generator=g))
            x = int(torch.randint(0, w - side + 1, (1,), generator=g))
            if y + side <= hy or x + side <= hx:
                return y, x

    def sample(self, n: int, g: torch.Generator, held_out: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        crops, labels, _ = self.sample_with_sides(n, g, held_out)
        return crops, labels

    def sample_with_sides(self, n: int, g: torch.Generator, held_out: bool = False):
        """sample()'s (crops, labels) and each crop's side in the photograph's px before resizing ([n] int64)."""
        k = len(self.photos)
        start = int(torch.randint(0, k, (1,), generator=g))
        labels = torch.tensor([(start + i) % k for i in range(n)])
        crops, sides = [], []
        for c in labels.tolist():
            h, w = self.photos[c].shape[1:]
            high = min(CROP_SIDES[1], int(HELD_OUT * h), int(HELD_OUT * w)) if held_out else CROP_SIDES[1]
            side = int(torch.randint(CROP_SIDES[0], high + 1, (1,), generator=g))
            sides.append(side)
            y, x = self._corner(c, side, g, held_out)
            crop = self.photos[c][None, :, y:y + side, x:x + side]
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            if bool(torch.rand(1, generator=g) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.cat(crops).clamp(-1, 1), labels, torch.tensor(sides)


class PhotoClassifier(nn.Module):
    """x: [B, 3, H, W] in [-1, 1], H, W ≥ 8 → logits [B, len(CLASSES)]. Five convs, global average
    pooling (so a 64 or 128 px canvas is read at the pixel scale of the 32 px crops), a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(128, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def parse_photo(prompt: Union[str, int]) -> int:
    """The class id of a prompt: an int 0..len(CLASSES)-1, or a string naming exactly one photograph
    ("chelsea", "a photo of rocket", "hubble deep field"). Anything else raises ValueError."""
    if isinstance(prompt, int) and not isinstance(prompt, bool) and 0 <= prompt < len(CLASSES):
        return prompt
    text = re.sub(r"[\s_-]+", "_", str(prompt).lower()) if isinstance(prompt, str) else ""
    found = [i for i, name in enumerate(CLASSES) if re.search(rf"(^|_){name}($|_)", text)]
    if len(found) != 1:
        raise ValueError(f"the photos model draws one of {', '.join(CLASSES)} (or its index); got {prompt!r}")
    return found[0]


class PhotosPipeline(DigitsPipeline):
    """Class-conditional RGB crops of photographs in pixel space (DigitsPipeline's sampler and outputs;
    images [B, H, W, 3] in "np"); H = W = 32 by default, any multiple of 2 (64, 128: larger canvases)."""

    null_class = NULL_CLASS
    class_names = CLASSES
    default_guidance_scale = 5.0  # recognition of 32 px samples: see photos_train.log and README.md

    @classmethod
    def class_id(cls, prompt: Union[str, int]) -> int:
        return parse_photo(prompt)

    def reference_classifier(self, device: Union[str, torch.device] = "cpu") -> nn.Module:
        return load_classifier(device=device)


def new_pipeline(seed: int = 0, pipeline_class=None, unet_config: Optional[dict] = None) -> PhotosPipeline:
    """An untrained pipeline with the photos architecture (what train.py starts from); pipeline_class /
    unet_config: another UNet on the same classes and noise schedule (photos_sdxl)."""
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True,
    )
    embedding = ClassEmbedding(num_classes=len(CLASSES) + 1, tokens=TOKENS, dim=CROSS_DIM)
    return (pipeline_class or PhotosPipeline)(UNet2DConditionModel(**(unet_config or UNET_CONFIG)), embedding, scheduler)


def load_pipeline(path: Optional[str] = None, device: Union[str, torch.device] = "cpu", dtype=torch.float32) -> PhotosPipeline:
    """The shipped photos pipeline (or one saved at `path`), in eval mode, without gradients."""
    from . import load_pipeline as load_reference

    return load_reference(path or PHOTOS_DIR, device=device, dtype=dtype, pipeline_class=PhotosPipeline)


def load_classifier(path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> PhotoClassifier:
    """The shipped photo classifier, in eval mode."""
    from safetensors.torch import load_file

    model = PhotoClassifier()
    model.load_state_dict(load_file(path or PHOTO_CLASSIFIER_PATH))
    return model.eval().requires_grad_(False).to(device)
