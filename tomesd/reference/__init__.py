"""A small trained reference model for judging what merging costs in image quality.

Random-weight UNets have none of the redundancy ToMe exploits, so closeness to the unpatched image
means nothing on them. This package ships a class-conditional pixel-space diffusion model trained
on scikit-learn's `load_digits` (8×8 digits upsampled to 16×16, one channel, in [-1, 1]) and a
small CNN classifier trained on the same images, so a sample can be judged both by its closeness to
the unpatched sample (PSNR, SSIM) and by "does it still show the requested digit".

- `DigitsPipeline`: a diffusers pipeline (unet + class_embedding + scheduler), loaded with
  `load_pipeline()` or `DigitsPipeline.from_pretrained(PIPELINE_DIR)`. Its UNet cross-attends to
  `TOKENS` learned tokens per class (class 10 is the unconditional class for classifier-free
  guidance). Transformer blocks at 16×16 (one down, two up: 256 tokens each, the level ToMe merges
  by default) and at 8×8 (down, mid and up: four blocks of 64 tokens, merged too with
  `max_downsample=2`). 16×16 rather than 32×32 so that it trains in under an hour on 2 shared cores.
  Pixel space: `vae_scale_factor = 1`.
- `DigitClassifier`: [B, 1, 16, 16] in [-1, 1] → [B, 10] logits; `load_classifier()`.
- `digits_dataset()`: the training images and labels.

Trained by `python -m tomesd.reference.train` (deterministic, log in `train.log` next to this file).
It is a small pixel-space model: it ranks merging settings, it does not predict Stable Diffusion's FID.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE_DIR = os.path.join(HERE, "digits")
CLASSIFIER_PATH = os.path.join(HERE, "classifier.safetensors")
SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the unconditional "class" for classifier-free guidance
TOKENS = 4  # cross-attention tokens per class
CROSS_DIM = 64

UNET_CONFIG = dict(
    sample_size=SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2),  # diffusers' legacy name: heads per level → 32 channels per head
    cross_attention_dim=CROSS_DIM,
    norm_num_groups=8,
)


def digits_dataset() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (images [1797, 1, SIZE, SIZE] float32 in [-1, 1], labels [1797] int64):
    the 8×8 images (0..16) scaled to [0, 1], upsampled bilinearly to SIZE × SIZE, mapped to [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the reference data needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(digits.target, dtype=torch.int64)


class ClassEmbedding(ModelMixin, ConfigMixin):
    """class ids [B] (0..num_classes, the last = unconditional) → encoder_hidden_states [B, tokens, dim]."""

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES + 1, tokens: int = TOKENS, dim: int = CROSS_DIM):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, tokens * dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(class_ids).view(class_ids.shape[0], self.config.tokens, self.config.dim)


class DigitClassifier(nn.Module):
    """x: [B, 1, SIZE, SIZE] in [-1, 1] → logits [B, 10]. Three conv stages and a linear head (~25k params)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def parse_digit(prompt: Union[str, int]) -> int:
    """The class id of a prompt: an int 0..9, or a string whose only digit names the class
    ("3", "digit 3", "a handwritten 3"). Anything else raises ValueError."""
    if isinstance(prompt, int) and not isinstance(prompt, bool) and 0 <= prompt < NUM_CLASSES:
        return prompt
    found = re.findall(r"\d", str(prompt)) if isinstance(prompt, str) else []
    if len(found) != 1:
        raise ValueError(f"the reference model draws one digit 0-9; a prompt must name exactly one, got {prompt!r}")
    return int(found[0])


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional 16×16 digits in pixel space.

    pipe(prompt="3" | ["1", "7"] | class_labels=[1, 7], num_inference_steps=20, guidance_scale=None
    (the class's default_guidance_scale, 2), generator=...) → ImagePipelineOutput(images): PIL images (output_type="pil"), a float array
    [B, H, W, 1] in [0, 1] ("np"), or a tensor [B, 1, H, W] in [-1, 1] ("pt"); H = W = 16 by default.
    The UNet sees a batch of 2·B (conditional and unconditional) when guidance_scale > 1.
    """

    model_cpu_offload_seq = "class_embedding->unet"
    vae_scale_factor = 1  # pixel space: one token per pixel at the top level
    null_class = NULL_CLASS  # the class embedding's unconditional row
    class_names = tuple(str(d) for d in range(NUM_CLASSES))  # one prompt per class, in class order
    default_guidance_scale = 2.0

    @classmethod
    def class_id(cls, prompt: Union[str, int]) -> int:
        """The class id a prompt names (a subclass with other classes overrides this and the two above)."""
        return parse_digit(prompt)

    def reference_classifier(self, device: Union[str, torch.device] = "cpu") -> nn.Module:
        """The classifier shipped with this model (its images → class logits)."""
        return load_classifier(device=device)

    def __init__(self, unet: UNet2DConditionModel, class_embedding: ClassEmbedding, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedding=class_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, int, Sequence[Union[str, int]], None] = None,
        class_labels: Optional[Sequence[int]] = None,
        num_inference_steps: int = 20,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        labels = self.labels(prompt, class_labels, num_images_per_prompt)
        height, width = height or self.unet.config.sample_size, width or self.unet.config.sample_size
        device, dtype = self.unet.device, self.unet.dtype
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance_scale > 1.0
        cond = self.conditioning(labels, guided, device, dtype)
        x = self.noise((len(labels), self.unet.config.in_channels, height, width), generator, device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if guided else x
            eps = self.predict(self.scheduler.scale_model_input(inp, t), t, cond)
            if guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = self.scheduler.step(eps, t, x).prev_sample
        return self.output(x, output_type, return_dict)

    # the seams a subclass with another denoiser or conditioning overrides (photos_sdxl, photos_flux)
    denoiser_name = "unet"  # the pipeline component train.py trains

    def labels(self, prompt, class_labels, num_images_per_prompt: int = 1) -> List[int]:
        """The class id of every image to make: each prompt's (or class label's), num_images_per_prompt times."""
        if (prompt is None) == (class_labels is None):
            raise ValueError("give exactly one of prompt and class_labels")
        if class_labels is None:
            prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
            class_labels = [self.class_id(p) for p in prompts]
        return [self.class_id(int(c)) for c in class_labels for _ in range(num_images_per_prompt)]

    def conditioning(self, labels: List[int], guided: bool, device, dtype) -> torch.Tensor:
        """encoder_hidden_states [B, tokens, dim] of the classes, then (guided) B rows of the unconditional class."""
        ids = torch.tensor(labels, device=device)
        cond = self.class_embedding(ids).to(dtype)
        if guided:
            cond = torch.cat([cond, self.class_embedding(torch.full_like(ids, self.null_class)).to(dtype)])
        return cond

    @staticmethod
    def noise(shape, generator, device, dtype) -> torch.Tensor:
        """The initial noise of shape [B, ...] (drawn on the CPU: the same images on every device)."""
        return _randn(shape, generator, device, dtype)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *extra) -> torch.Tensor:
        """The UNet's noise prediction for x [B, C, H, W] at timestep t given cond [B, tokens, dim]
        (extra: a subclass's conditioning from its training batches)."""
        return self.unet(x, t, encoder_hidden_states=cond).sample

    def training_loss(self, x0: torch.Tensor, class_ids: torch.Tensor, g: torch.Generator, *extra) -> torch.Tensor:
        """Epsilon-prediction MSE on x0 [B, C, H, W] in [-1, 1] at uniform random timesteps of the
        scheduler's noise schedule (t, then the noise, drawn from g: train.py's loop)."""
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = self.scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(self.predict(xt, t, self.class_embedding(class_ids), *extra), noise)

    def output(self, x: torch.Tensor, output_type: str, return_dict: bool):
        """Images x [B, C, H, W] as output_type ("pt": clamped to [-1, 1]; "np": [B, H, W, C] in [0, 1]; "pil")."""
        x = x.clamp(-1, 1)
        if output_type == "pt":
            images = x
        else:
            arr = ((x + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
            images = self.numpy_to_pil(arr) if output_type == "pil" else arr
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """Noise drawn on the CPU (same images on every device); one generator per image or one for all."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images")
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        x = torch.randn(shape, generator=generator)
    return x.to(device=device, dtype=dtype)


def new_pipeline(seed: int = 0) -> DigitsPipeline:
    """An untrained pipeline with the reference architecture (what train.py starts from)."""
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True,
    )
    return DigitsPipeline(UNet2DConditionModel(**UNET_CONFIG), ClassEmbedding(), scheduler)


def load_pipeline(path: Optional[str] = None, device: Union[str, torch.device] = "cpu", dtype=torch.float32,
                  pipeline_class=None) -> DigitsPipeline:
    """The shipped reference pipeline (or one saved at `path`; pipeline_class: DigitsPipeline or a
    subclass, e.g. photos.PhotosPipeline), in eval mode, without gradients."""
    path = path or PIPELINE_DIR
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no reference model at {path}: train one with python -m tomesd.reference.train")
    from ..tools.quiet import dtype_kwarg_quiet

    with dtype_kwarg_quiet():
        pipe = (pipeline_class or DigitsPipeline).from_pretrained(path, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (getattr(pipe, pipe.denoiser_name), pipe.class_embedding):
        module.eval().requires_grad_(False)
    return pipe.to(device)


def load_classifier(path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> DigitClassifier:
    """The shipped digit classifier, in eval mode."""
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(path or CLASSIFIER_PATH))
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per image; images [B, C, H, W] in [-1, 1] (or [B, H, W, C] in [0, 1], numpy layout),
    C = 1 (digits) or 3 (photos)."""
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2) * 2 - 1
    device = next(classifier.parameters()).device
    return classifier(images.float().to(device)).argmax(1).cpu()
