"""The photos model's part of `python -m tomesd.reference.train --model photos`: its defaults, its
classifier and its training batches (the diffusion loop is train.py's, shared with the digits model).

Classifier: PhotoClassifier on training-region crops (PhotoCrops, random scales and flips, light
noise so it also reads imperfect samples), `--classifier-epochs` rounds of 100 batches of 64; held-out
accuracy on a fixed set of 50 crops per photograph from the held-out squares after each round.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import classify
from .photos import CLASSES, PHOTO_CLASSIFIER_PATH, PHOTOS_DIR, PHOTOS_LOG, UNET_CONFIG, PhotoClassifier, PhotoCrops, new_pipeline

DEFAULTS = dict(
    out=PHOTOS_DIR, classifier_out=PHOTO_CLASSIFIER_PATH, log=PHOTOS_LOG, steps=2000, batch=16, lr=1e-3, warmup=200,
    ema=0.998, p_uncond=0.1, max_minutes=65.0, eval_every=500, eval_samples=48, classifier_epochs=8, threads=1,
)
HELD_OUT_PER_CLASS = 50
BATCHES_PER_EPOCH = 100


def held_out_set(crops: PhotoCrops, seed: int):
    """The fixed evaluation crops: HELD_OUT_PER_CLASS per photograph, from the held-out squares."""
    return crops.sample(HELD_OUT_PER_CLASS * len(CLASSES), torch.Generator().manual_seed(seed + 100), held_out=True)


def train_classifier(crops: PhotoCrops, args, log) -> PhotoClassifier:
    g = torch.Generator().manual_seed(args.seed)
    xt, yt = held_out_set(crops, args.seed)
    torch.manual_seed(args.seed)
    model = PhotoClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    total = args.classifier_epochs * BATCHES_PER_EPOCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    for epoch in range(args.classifier_epochs):
        model.train()
        for _ in range(BATCHES_PER_EPOCH):
            xb, yb = crops.sample(64, g)
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc = (classify(model, xt) == yt).float().mean().item()
        log(f"classifier round {epoch + 1}/{args.classifier_epochs} ({BATCHES_PER_EPOCH} batches of 64): loss {loss.item():.4f}, "
            f"held-out accuracy {acc:.4f} ({len(yt)} crops)")
    per_class = [(classify(model, xt[yt == c]) == c).float().mean().item() for c in range(len(CLASSES))]
    log("classifier: held-out accuracy per photograph: " + ", ".join(f"{n} {a:.2f}" for n, a in zip(CLASSES, per_class)))
    return model


def setup(args, log):
    """(pipeline to train, classifier, batch function (g, n) → (x0, classes), unet config, num classes)."""
    crops = PhotoCrops()
    sizes = ", ".join(f"{n} {tuple(p.shape[1:])}" for n, p in zip(CLASSES, crops.photos))
    log(f"data: {len(CLASSES)} photographs (skimage.data, sklearn sample images), resized to {sizes}")
    classifier = train_classifier(crops, args, log)
    return new_pipeline(args.seed), classifier, crops.sample, UNET_CONFIG, len(CLASSES)
