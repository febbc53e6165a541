"""The one model loader of the tools (bench, quality, visualize and the examples).

A model name is one of:
- a built-in architecture (tomesd.tools.archs: `ARCHS` UNets, `TRANSFORMER_ARCHS` MMDiT transformers),
  built with random weights (`build_denoiser`; speed and memory do not depend on the weights);
- a name of `NAMED`, the shipped trained models: "reference" (digits, tomesd.reference), "photos"
  (photographs, tomesd.reference.photos), "photos-sdxl" and "photos-flux" (an SDXL-layout UNet and a
  Flux transformer trained on the same photographs: tomesd.reference.photos_sdxl, photos_flux); tools'
  --help (`model_help`) and size notes (`size_note`) are read from that table, so a model added there
  is listed everywhere;
- a local directory: a diffusers pipeline (model_index.json; a saved reference pipeline is
  recognized by its class name) or a bare UNet directory (config.json, for `load_unet`);
- a Hugging Face hub id (owner/name), loaded by diffusers (from its cache when HF_HUB_OFFLINE=1).

`DTYPES` maps the tools' dtype names to torch dtypes; `model_problem` says in one line why a name
cannot be loaded, before any work. Imports diffusers only when called.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .archs import ARCHS, TRANSFORMER_ARCHS, build_transformer
from .cli import error_line
from .quiet import diffusers_quiet, dtype_kwarg_quiet, loading_quiet, warnings_held

REFERENCE = "reference"
REFERENCE_CLASS = "DigitsPipeline"
PHOTOS = "photos"
PHOTOS_SDXL, PHOTOS_FLUX = "photos-sdxl", "photos-flux"
# pipeline classes of tomesd.reference, by model_index name
REFERENCE_CLASSES = (REFERENCE_CLASS, "PhotosPipeline", "PhotosSDXLPipeline", "PhotosFluxPipeline")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION = ("sdpa", "math")  # diffusers' AttnProcessor2_0 / AttnProcessor


def _digits_dir() -> str:
    from ..reference import PIPELINE_DIR

    return PIPELINE_DIR


def _photos_dir() -> str:
    from ..reference.photos import PHOTOS_DIR

    return PHOTOS_DIR


def _photos_sdxl_dir() -> str:
    from ..reference.photos_sdxl import SDXL_DIR

    return SDXL_DIR


def _photos_flux_dir() -> str:
    from ..reference.photos_flux import FLUX_DIR

    return FLUX_DIR


@dataclass(frozen=True)
class Named:
    """A shipped model a tool loads by name: its pipeline directory (`directory()`), what it is (one
    line for --help), the square sizes in px it draws well, and what it draws elsewhere."""

    directory: Callable[[], str]
    description: str
    sizes: Tuple[int, ...]
    elsewhere: str


# Every model a name loads: --help texts (model_help) and the size notes (size_note) are read from here.
NAMED: Dict[str, Named] = {
    REFERENCE: Named(_digits_dir, "the shipped digits model: a prompt names a digit; 16 px", (16,),
                     "strokes, not digits"),
    PHOTOS: Named(_photos_dir, "the shipped photographs model: a prompt names a photograph, e.g. chelsea; 32 px, "
                  "and 64 / 128 px canvases of its colours and textures", (32, 64, 128),
                  "what was never looked at (it was trained on 32 px crops)"),
    PHOTOS_SDXL: Named(_photos_sdxl_dir, "the shipped photographs model in SDXL's UNet layout: a prompt names a "
                       "photograph; 64 px, and 128 / 256 px canvases", (64, 128, 256),
                       "what was never looked at (it was trained on 64 px crops)"),
    PHOTOS_FLUX: Named(_photos_flux_dir, "the shipped photographs model as a Flux transformer: a prompt names a "
                       "photograph; 32 px, and 64 / 128 px canvases", (32, 64, 128),
                       "what was never looked at (it was trained on 32 px crops)"),
}


def model_help(builtin: str = "") -> str:
    """The --model help of a tool: every name of NAMED with its description, `builtin` (e.g. the
    bench's architectures), a local diffusers pipeline directory, a hub id."""
    named = "; ".join(f"'{name}' ({entry.description})" for name, entry in NAMED.items())
    return f"{named}; {builtin + '; ' if builtin else ''}a local diffusers pipeline directory; or a hub id (owner/name)"


def size_note(model: str, height: int, width: int) -> str:
    """One line when a named model is asked for a size it does not draw well, else ""."""
    entry = NAMED.get(model)
    if entry is None or (height == width and height in entry.sizes):
        return ""
    sizes = " / ".join(str(s) for s in entry.sizes)
    return f"note: --model {model} draws well at {sizes} px square; at {width}x{height} px expect {entry.elsewhere}"


def reference_dir(model: str) -> Optional[str]:
    """The pipeline directory if `model` names a reference model (NAMED) or a saved copy of one, else None."""
    if model in NAMED:
        return NAMED[model].directory()
    return model if reference_class_name(model) is not None else None


def reference_class_name(path: str) -> Optional[str]:
    """'DigitsPipeline' or 'PhotosPipeline' if `path` holds a saved tomesd.reference pipeline, else None."""
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            name = json.load(f).get("_class_name")
        return name if name in REFERENCE_CLASSES else None
    return None


def reference_pipeline_class(model: str):
    """The tomesd.reference pipeline class of `model` (see reference_dir), or None for any other model."""
    path = reference_dir(model)
    if path is None:
        return None
    from ..reference import DigitsPipeline
    from ..reference.photos import PhotosPipeline
    from ..reference.photos_flux import PhotosFluxPipeline
    from ..reference.photos_sdxl import PhotosSDXLPipeline

    classes = {c.__name__: c for c in (PhotosPipeline, PhotosSDXLPipeline, PhotosFluxPipeline)}
    return classes.get(reference_class_name(path), DigitsPipeline)


def unet_subfolder(model: str) -> Optional[str]:
    """'unet' for a pipeline (a directory with unet/, or a hub id), None for a bare UNet directory."""
    if os.path.isfile(os.path.join(model, "config.json")) and not os.path.isdir(os.path.join(model, "unet")):
        return None
    return "unet"


def model_problem(model: str, kind: str = "unet", hub: bool = True) -> str:
    """Why `model` cannot give a `kind` ("unet" or "pipeline"), in one line ("" if it looks usable):
    a local directory must hold a pipeline (model_index.json) or, for a UNet, unet/config.json or
    config.json; anything else must be "reference" or a hub id (owner/name) whose config loads (from
    the cache or the hub; hub=False: an id is taken as it is, and loading will tell)."""
    if model == PHOTOS_FLUX and kind == "unet":
        return f"{model} is a Flux transformer, not a UNet (tomesd.quality and the examples load its pipeline)"
    if model in NAMED:
        return ""
    if os.path.isdir(model):
        has = {name: os.path.isfile(os.path.join(model, name)) for name in ("model_index.json", "unet/config.json", "config.json")}
        if kind == "pipeline" and not has["model_index.json"]:
            return f"{model} is a directory but holds no diffusers pipeline (no model_index.json)"
        if kind == "unet" and not (has["unet/config.json"] or has["config.json"]):
            return f"{model} is a directory but holds no diffusers model (no unet/config.json or config.json)"
        return ""
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return f"{model}: no such model directory (and not a hub id owner/name)"
    if not hub:
        return ""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    try:
        if kind == "pipeline":
            DiffusionPipeline.load_config(model)
        else:
            UNet2DConditionModel.load_config(model, subfolder=unet_subfolder(model))
    except Exception as error:  # noqa: BLE001 - any failure is reported in one line
        return f"{model}: cannot load its {'UNet ' if kind == 'unet' else ''}config ({error_line(error)})"
    return ""


def load_unet(model: str, dtype=None, device="cpu"):
    """The UNet2DConditionModel of `model` ("reference", a pipeline or UNet directory, a hub id) on
    `device` in `dtype` (None: as saved), in eval mode without gradients. device "meta": the
    architecture from its config, without weights (to check settings against it cheaply)."""
    from diffusers import UNet2DConditionModel

    path = reference_dir(model) or model
    if str(device) == "meta":
        config = UNet2DConditionModel.load_config(path, subfolder=unet_subfolder(path))
        with torch.device("meta"), diffusers_quiet():
            unet = UNet2DConditionModel.from_config(config)
        return unet.eval().requires_grad_(False)
    with dtype_kwarg_quiet():
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=unet_subfolder(path), torch_dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def build_denoiser(arch: str, dtype=torch.float32, device="cpu", seed: int = 0, layers: Optional[int] = None):
    """The built-in architecture `arch` (a key of ARCHS or TRANSFORMER_ARCHS) with random weights
    (seeded), initialized on `device` (SDXL has 2.6B parameters) in `dtype`, in eval mode without
    gradients. layers: for a transformer, keep this many blocks of each kind (None: all)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device), diffusers_quiet():  # random weights: no "modules to keep in float32" to worry about
        if arch in TRANSFORMER_ARCHS:
            model = build_transformer(TRANSFORMER_ARCHS[arch], layers=layers)
        else:
            model = UNet2DConditionModel(**ARCHS[arch].config)
        if dtype != torch.float32:
            model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_denoiser(name: str, dtype=torch.float32, device="cpu", seed: int = 0, layers: Optional[int] = None,
                  attention: str = "sdpa"):
    """The denoiser `name` names: a built-in architecture (build_denoiser) or a model's UNet
    (load_unet); a UNet gets the `attention` processor (ATTENTION). device "meta": no weights."""
    if name in ARCHS or name in TRANSFORMER_ARCHS:
        model = build_denoiser(name, dtype, device, seed, layers)
    else:
        model = load_unet(name, dtype, device)
    if name not in TRANSFORMER_ARCHS:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        model.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    return model


def load_pipeline(model: str, dtype=None, device="cpu"):
    """The pipeline of `model` ("reference", "photos", a local pipeline directory, a hub id) on `device`
    in `dtype` (None: float32), progress bars off. The reference models give a tomesd.reference.DigitsPipeline
    or PhotosPipeline; anything else what diffusers' DiffusionPipeline.from_pretrained makes of it."""
    dtype = torch.float32 if dtype is None else dtype
    path = reference_dir(model)
    if path is not None:
        from ..reference import load_pipeline as load_reference

        with loading_quiet():
            return load_reference(path, device=device, dtype=dtype, pipeline_class=reference_pipeline_class(path))
    from diffusers import DiffusionPipeline

    with dtype_kwarg_quiet(), loading_quiet(), warnings_held():  # a failure is the caller's one line, not a log
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---- what a loaded pipeline takes (the examples ask before generating) ----

def is_class_pipeline(pipe) -> bool:
    """True for the shipped reference pipelines (tomesd.reference): prompts name a class, not text."""
    return callable(getattr(pipe, "class_id", None))


def pipeline_size(pipe) -> int:
    """The image side in px a pipeline generates by default (its denoiser's sample size × the VAE's
    factor; diffusers' default_sample_size where the denoiser has none, e.g. Flux)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", 64)
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))


def patch_size(pipe) -> int:
    """Latent cells per token side of a pipeline's denoiser: 2 for Flux (it packs 2×2 latent cells into a
    token), the transformer's patch size for SD 3 / 3.5, DiT and PixArt, 1 for UNets."""
    if type(pipe).__name__.startswith("Flux"):
        return 2
    size = getattr(pipe, "patch_size", None)  # SD 3 pipelines hold it
    if not isinstance(size, int):
        config = getattr(getattr(pipe, "transformer", None), "config", None)
        size = config.get("patch_size") if hasattr(config, "get") else None
    return size if isinstance(size, int) and size > 0 else 1


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's factor × the denoiser's patch size (patch_size:
    16 for SD 3 and Flux, 8 for SD 1.x / 2.x / XL) for latent pipelines, 2^(downsampling levels) for
    pixel-space UNets (vae_scale_factor 1)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if factor > 1:
        return factor * patch_size(pipe)
    if getattr(pipe, "denoiser_name", "unet") == "transformer":  # photos-flux: pixels packed 2×2
        return 2
    unet = getattr(pipe, "unet", None)
    levels = len(getattr(getattr(unet, "config", None), "block_out_channels", (0,))) - 1
    return 2 ** max(levels, 0)


def size_problem(pipe, height: int, width: int, flags=("--height", "--width")) -> str:
    """One line if `pipe` cannot generate height × width px, else "" (flags: how the sizes were given)."""
    step = size_multiple(pipe)
    bad = [f"{flag} {value}" for flag, value in zip(flags, (height, width)) if value < step or value % step]
    if bad:
        bad = list(dict.fromkeys(bad))  # one size given once (--sizes) is named once
        return f"{', '.join(bad)}: {type(pipe).__name__} needs multiples of {step} px (its default is {pipeline_size(pipe)})"
    return ""


def prompt_problem(pipe, prompt) -> str:
    """One line if a class pipeline cannot read `prompt` (a text pipeline reads anything), else ""."""
    if not is_class_pipeline(pipe):
        return ""
    try:
        pipe.class_id(prompt)
    except ValueError as error:
        return f"--prompt: {error}"
    return ""
