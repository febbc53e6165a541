"""Image metrics of `tomesd.quality` against the unpatched images: PSNR (pooled and per image), SSIM,
LPIPS (AlexNet, only when torchvision and its weights are already on disk: nothing is downloaded)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict


def lpips_metric(device: str):
    """(callable(a, b) → LPIPS per image, None) when torchvision and its AlexNet weights are already
    installed, else (None, why). Never downloads."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "LPIPS skipped: torchvision is not installed"
    try:
        import torch
        import torchvision

        url = torchvision.models.AlexNet_Weights.DEFAULT.url
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(weights):
            return None, f"LPIPS skipped: the AlexNet weights are not at {weights} (tomesd never downloads them)"
        from torchmetrics.functional.image import (
            learned_perceptual_image_patch_similarity as lpips,
        )
    except (ImportError, AttributeError) as error:
        return None, f"LPIPS skipped: {error}"

    def measure(a, b):  # [B, C, H, W] in [0, 1]; one channel is repeated to three
        a, b = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in (a, b))
        return lpips(a.to(device), b.to(device), net_type="alex", reduction="mean", normalize=True)

    return measure, None


class Metrics:
    """PSNR / SSIM / LPIPS of images [B, C, H, W] in [0, 1] against the unpatched ones."""

    def __init__(self, device: str):
        self.device = device
        self.lpips, self.lpips_note = lpips_metric(device)

    def __call__(self, images, base) -> Dict[str, Any]:
        import torch
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        x, y = images.double(), base.double()
        per_image = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
        out = dict(
            psnr=float(peak_signal_noise_ratio(x, y, data_range=1.0)),
            psnr_min=float(per_image.min()),
            ssim=float(structural_similarity_index_measure(x, y, data_range=1.0)),
            identical=bool(torch.equal(images, base)),
            tile_psnr=[float(v) for v in per_image],
            lpips=None,
        )
        if self.lpips is not None:
            try:
                out["lpips"] = float(self.lpips(images.float(), base.float()))
            except (RuntimeError, ValueError) as error:  # e.g. images too small for AlexNet
                self.lpips, self.lpips_note = None, f"LPIPS skipped: {str(error).splitlines()[0]}"
        return out
