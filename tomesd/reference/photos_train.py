"""The photos models' part of `python -m tomesd.reference.train --model photos|photos-sdxl|photos-flux`:
their defaults, classifier and training batches (`MODELS`; the diffusion loop is train.py's, shared
with the digits model, the loss each pipeline's `training_loss`).

Classifier: PhotoClassifier on training-region crops (PhotoCrops, random scales and flips, light
noise so it also reads imperfect samples), `--classifier-epochs` rounds of 100 batches of 64; held-out
accuracy on a fixed set of 50 crops per photograph from the held-out squares after each round.
photos-sdxl and photos-flux reuse it as shipped (photos-sdxl at half scale: see photos_sdxl.py) and
log its accuracy on the held-out crops at their own size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import classify
from .photos import CLASSES, PHOTO_CLASSIFIER_PATH, PHOTOS_DIR, PHOTOS_LOG, UNET_CONFIG, PhotoClassifier, PhotoCrops, new_pipeline
from .photos_flux import FLUX_DIR, FLUX_LOG
from .photos_sdxl import SDXL_DIR, SDXL_LOG

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


def reused_classifier(crops: PhotoCrops, classifier, args, log, what: str):
    """Log the shipped classifier's held-out accuracy on `crops` (the model's size) and return it."""
    xt, yt = held_out_set(crops, args.seed)
    right = classify(classifier, xt) == yt
    per_class = ", ".join(f"{n} {right[yt == c].float().mean().item():.2f}" for c, n in enumerate(CLASSES))
    log(f"classifier: {what}, not retrained: held-out accuracy {right.float().mean().item():.4f} on {len(yt)} "
        f"{crops.size} px crops; per photograph: {per_class}")
    return classifier


def sdxl_setup(args, log):
    """photos_sdxl: the photos crops at 64 px with their sides (the UNet's "original size"), judged by
    the photos classifier at half scale."""
    from .photos_sdxl import SIZE, UNET_CONFIG as SDXL_UNET, load_classifier, new_pipeline as new_sdxl

    crops = PhotoCrops(size=SIZE)
    log(f"data: the photos model's crops at {SIZE} px, with each crop's side in photograph px as time_ids")
    classifier = reused_classifier(crops, load_classifier(), args, log, "the photos classifier at half scale")
    return new_sdxl(args.seed), classifier, crops.sample_with_sides, SDXL_UNET, len(CLASSES)


def flux_setup(args, log):
    """photos_flux: the photos crops at 32 px, judged by the photos classifier."""
    from .photos import load_classifier
    from .photos_flux import SIZE, TRANSFORMER_CONFIG, new_pipeline as new_flux

    crops = PhotoCrops(size=SIZE)
    log(f"data: the photos model's crops at {SIZE} px")
    classifier = reused_classifier(crops, load_classifier(), args, log, "the photos classifier")
    return new_flux(args.seed), classifier, crops.sample, TRANSFORMER_CONFIG, len(CLASSES)


def _defaults(out: str, log: str, **changes) -> dict:
    """The photos defaults for another model on the same data: its output and log, no classifier to save."""
    return dict(DEFAULTS, out=out, log=log, classifier_out=None, **changes)


# --model NAME of train.py → (its defaults, its setup). photos-sdxl and photos-flux are sized for ≤ ~60 minutes on
# one thread of a 2-core CPU; their --max-minutes guard is four times that, so that a machine loaded by other work
# still runs every step (a run cut by the guard gives other weights than one that finishes). The shipped photos-flux
# run had a 60-minute guard, which stopped it after step 1261 of its 1,400-step schedule: stop_at=1261 reproduces
# those weights (its log: photos_flux_train.log).
MODELS = {
    "photos": (DEFAULTS, setup),
    "photos-sdxl": (_defaults(SDXL_DIR, SDXL_LOG, steps=700, batch=8, warmup=100, eval_every=350, eval_samples=12,
                              max_minutes=240.0), sdxl_setup),
    "photos-flux": (_defaults(FLUX_DIR, FLUX_LOG, steps=1400, stop_at=1261, batch=16, eval_every=350, eval_samples=24,
                              max_minutes=240.0),
                    flux_setup),
}
