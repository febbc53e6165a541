"""Train a reference model and its classifier: `python -m tomesd.reference.train [--model photos]`.

--model digits (default) trains the digits model described below; --model photos trains the photos
model (tomesd.reference.photos; its classifier and batches in photos_train.py, its defaults there too:
log photos_train.log, 1 thread, 2000 steps of 16 crops) with the same diffusion loop; --model
photos-sdxl / photos-flux train the SDXL-layout UNet and the Flux transformer on the same photographs
(tomesd.reference.photos_sdxl, photos_flux; defaults in photos_train.MODELS), reusing the photos
classifier. The loss is the pipeline's own (`training_loss`: epsilon prediction for the UNets, flow
matching for photos-flux).

Deterministic (seeded, single process, CPU): the same command gives the same weights on the same
torch build. Two phases, both logged to `--log` (default tomesd/reference/train.log):

1. classifier: DigitClassifier on an 80/20 stratified split of the upsampled digits, with random
   shifts of up to ±2 px and light noise so it also reads imperfect samples; logs held-out accuracy
   and saves `classifier.safetensors`.
2. diffusion: the DigitsPipeline UNet + class embedding on all 1797 digits, epsilon prediction,
   cosine noise schedule (1000 steps), AdamW with warmup and cosine decay, an EMA of the weights;
   the class is dropped (→ unconditional class) 10% of the time for classifier-free guidance.
   Every `--eval-every` steps the EMA weights are saved as a pipeline (so a usable model exists if
   the run is cut short) and `--eval-samples` samples (20 sampler steps, guidance 2) are classified.

A run stops at `--steps` (or earlier at `--stop-at`, the learning-rate schedule still spanning --steps) or
when `--max-minutes` have passed, whichever comes first, and saves.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from ..tools import threads
from . import (
    CLASSIFIER_PATH, HERE, NUM_CLASSES, PIPELINE_DIR, UNET_CONFIG, DigitClassifier,
    classify, digits_dataset, new_pipeline,
)


class Log:
    """Lines to stdout and to a file (flushed per line, so a background run can be followed)."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w")
        self.t0 = time.perf_counter()

    def __call__(self, msg: str):
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image [B, 1, H, W] translated by a random integer offset in [-max_shift, max_shift], padded with -1."""
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def split(labels: torch.Tensor, g: torch.Generator, held_out: float = 0.2):
    """Stratified train / held-out indices."""
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * held_out))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(test)


def train_classifier(x, y, args, log) -> DigitClassifier:
    g = torch.Generator().manual_seed(args.seed)
    tr, te = split(y, g)
    torch.manual_seed(args.seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(args.classifier_epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = shift(x[idx], g, 2)
            xb = (xb + 0.1 * torch.randn(xb.shape, generator=g)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        acc = (classify(model, x[te]) == y[te]).float().mean().item()
        log(f"classifier epoch {epoch + 1}/{args.classifier_epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f} ({len(te)} images)")
    shifted = (classify(model, shift(x[te], g, 1)) == y[te]).float().mean().item()
    log(f"classifier: held-out accuracy {acc:.4f}, on held-out images shifted by up to ±1 px {shifted:.4f}")
    return model


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(pipe, classifier, args, num_classes: int = NUM_CLASSES) -> float:
    """Accuracy of the classifier on args.eval_samples samples (classes round-robin), fixed seed."""
    labels = [i % num_classes for i in range(args.eval_samples)]
    g = torch.Generator().manual_seed(1234)
    images = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=2.0, generator=g, output_type="pt").images
    return (classify(classifier, images) == torch.tensor(labels)).float().mean().item()


def save_pipeline(pipe, ema_unet, ema_emb, out: str):
    saved = copy.copy(pipe)
    saved.register_modules(**{pipe.denoiser_name: ema_unet}, class_embedding=ema_emb, scheduler=pipe.scheduler)
    saved.save_pretrained(out, safe_serialization=True)


def digits_setup(args, log):
    """(pipeline to train, classifier, batch function (n, g) → (x0, classes), unet config, num classes)."""
    x, y = digits_dataset()
    log(f"data: sklearn load_digits, {len(x)} images upsampled to {tuple(x.shape[1:])}")
    classifier = train_classifier(x, y, args, log)

    def batch(n: int, g: torch.Generator):
        idx = torch.randint(0, len(x), (n,), generator=g)
        return x[idx], y[idx].clone()

    return new_pipeline(args.seed), classifier, batch, UNET_CONFIG, NUM_CLASSES


def main(argv=None) -> int:
    model = argparse.ArgumentParser(add_help=False)
    from .photos_train import MODELS

    model.add_argument("--model", choices=("digits", *MODELS), default="digits")
    photos = MODELS.get(model.parse_known_args(argv)[0].model)  # (defaults, setup), None for digits
    p = argparse.ArgumentParser(parents=[model], prog="python -m tomesd.reference.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=PIPELINE_DIR, help="pipeline directory (default: the shipped one)")
    p.add_argument("--classifier-out", default=CLASSIFIER_PATH)
    p.add_argument("--log", default=os.path.join(HERE, "train.log"))
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=58.0)
    p.add_argument("--stop-at", type=int, default=None, help="stop and save after this step, the schedule still "
                   "spanning --steps (reproduces a run its --max-minutes guard stopped there)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: OMP_NUM_THREADS when set, else the cores free now, tomesd.tools.threads: "
                        "on a shared 2-core machine two OpenMP threads ran 5x slower, a 2-thread timing run of the "
                        "photos model 6.5 s/step against 0.7 s/step on idle cores); the shipped digits and photos "
                        "models were trained with 1 (other counts may round differently)")
    p.add_argument("--seed", type=int, default=0)
    if photos:
        p.set_defaults(**photos[0])
    args = p.parse_args(argv)

    choice = threads.set_threads(args.threads, say=False)
    log = Log(args.log)
    log(f"python -m tomesd.reference.train {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(choice.line)
    import diffusers
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}, {choice.threads} threads")
    log(f"settings: {vars(args)}")
    setup = photos[1] if photos else digits_setup
    pipe, classifier, batch, unet_config, num_classes = setup(args, log)
    if args.classifier_out:  # None: a classifier reused as shipped (photos-sdxl, photos-flux)
        from safetensors.torch import save_file
        save_file(classifier.state_dict(), args.classifier_out)
        log(f"saved {args.classifier_out}")

    name = pipe.denoiser_name
    unet, emb, sched = getattr(pipe, name), pipe.class_embedding, pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    params = list(unet.parameters()) + list(emb.parameters())
    log(f"{name}: {unet_config}")
    log(f"parameters: {name} {sum(t.numel() for t in unet.parameters())}, class embedding {sum(t.numel() for t in emb.parameters())}")
    ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    ema_emb = copy.deepcopy(emb).requires_grad_(False).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_emb.parameters())
    eval_pipe = type(pipe)(ema_unet, ema_emb, sched)
    sampler = type(sched).__name__.replace("Scheduler", "")  # DDIM, FlowMatchEulerDiscrete
    eval_pipe.set_progress_bar_config(disable=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 1)
    t_start, losses, step = time.perf_counter(), [], 0
    unet.train()
    while step < args.steps:
        x0, c, *extra = batch(args.batch, g)
        c[torch.rand(args.batch, generator=g) < args.p_uncond] = pipe.null_class
        loss = pipe.training_loss(x0, c, g, *extra)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [q.detach() for q in params], 1 - decay)
        losses.append(loss.item())
        step += 1
        minutes = (time.perf_counter() - t_start) / 60
        out_of_time = minutes >= args.max_minutes
        stopped = args.stop_at is not None and step >= args.stop_at
        if step % 50 == 0:
            log(f"step {step}/{args.steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, lr {lr_at(step, args):.2e}, "
                f"{minutes * 60 / step:.2f} s/step")
        if step % args.eval_every == 0 or step == args.steps or out_of_time or stopped:
            save_pipeline(pipe, ema_unet, ema_emb, args.out)
            acc = evaluate(eval_pipe, classifier, args, num_classes)
            log(f"step {step}: saved EMA weights to {args.out}; sample accuracy {acc:.3f} ({args.eval_samples} samples, 20 {sampler} steps, guidance 2)")
        if out_of_time or stopped:
            log(f"stopping at step {step}: " + (f"--max-minutes {args.max_minutes} reached" if out_of_time else "--stop-at"))
            break
    log(f"done: {step} steps in {(time.perf_counter() - t_start) / 60:.1f} min ({time.process_time() / 60:.1f} min of CPU time "
        f"in all), final loss (mean of last 200) {sum(losses[-200:]) / len(losses[-200:]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
