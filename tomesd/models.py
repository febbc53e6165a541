"""One way for the tools (bench, quality, examples) to load a model named on the command line.

A model name is one of:
- "reference": the trained digits model shipped in `tomesd/reference/` (see tomesd.reference);
- a local directory: a diffusers pipeline (with model_index.json; a saved reference pipeline is
  recognized by its class name) or a bare UNet directory (config.json, for `load_unet`);
- a Hugging Face hub id, loaded by diffusers (from its cache when HF_HUB_OFFLINE=1).

Imports diffusers only when called.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Optional

REFERENCE = "reference"
REFERENCE_CLASS = "DigitsPipeline"


def reference_dir(model: str) -> Optional[str]:
    """The pipeline directory if `model` names the reference model or a saved copy of it, else None."""
    if model == REFERENCE:
        from .reference import PIPELINE_DIR

        return PIPELINE_DIR
    index = os.path.join(model, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            if json.load(f).get("_class_name") == REFERENCE_CLASS:
                return model
    return None


def unet_subfolder(model: str) -> Optional[str]:
    """'unet' for a pipeline (a directory with unet/, or a hub id), None for a bare UNet directory."""
    if os.path.isfile(os.path.join(model, "config.json")) and not os.path.isdir(os.path.join(model, "unet")):
        return None
    return "unet"


@contextlib.contextmanager
def dtype_kwarg_quiet():
    with warnings.catch_warnings():  # newer diffusers call it `dtype`; 0.32 knows only `torch_dtype`
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def load_unet(model: str, dtype=None, device="cpu"):
    """The UNet2DConditionModel of `model` ("reference", a pipeline or UNet directory, a hub id) on
    `device` in `dtype` (None: as saved), in eval mode without gradients."""
    from diffusers import UNet2DConditionModel

    path = reference_dir(model) or model
    with dtype_kwarg_quiet():
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=unet_subfolder(path), torch_dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def load_pipeline(model: str, dtype=None, device="cpu"):
    """The pipeline of `model` ("reference", a local pipeline directory, a hub id) on `device` in
    `dtype` (None: float32), progress bars off. The reference model gives a tomesd.reference.DigitsPipeline;
    anything else what diffusers' DiffusionPipeline.from_pretrained makes of it."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    path = reference_dir(model)
    if path is not None:
        from .reference import load_pipeline as load_reference

        return load_reference(path, device=device, dtype=dtype)
    from diffusers import DiffusionPipeline

    with dtype_kwarg_quiet():
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
