"""Analytic ceilings of token merging per step: the matmul FLOPs of a whole denoiser step without merging
over those with the merged sub-layers run on fewer tokens, for the real SD 1.5, SDXL, SD 3.5 Medium and
Flux.1 dev architectures at 1024 / 1536 / 2048 px (issue 29: what caps a per-step speed-up).

Counted, not written by hand: every model is built on the meta device (no memory, no weights) and called
once under torch's FlopCounterMode, which counts each matmul, convolution and SDPA call per module.
Merging in tokens mode runs a merged sub-layer on the same call with fewer image tokens, so its FLOPs
come from a second call at a canvas with that many tokens (the width times 1 − ratio: ratios whose
canvas is a whole number of tokens; for a UNet every level shrinks alike, and only the merged levels'
sub-layers are read from it). kv mode (Flux, today's default there) keeps every projection and the
queries: its attention core's FLOPs scale with the keys' length (merged image + text tokens).

A ceiling is a FLOP ratio: it assumes merging, matching and unmerging cost nothing and every FLOP costs
the same time. Time falls short of it by what matching and the copies cost, and can beat it where the
merged part costs more per FLOP than the rest (a CPU's SDPA and softmax, memory-bound norms and
activations, none of them counted): SD 1.5's default measured 1.42× per whole step at 1024 px on a CPU
(BENCHMARKS.md, issue 34) against a 1.39× ceiling here. Read it as where the work is, not as a bound.
Merged sub-layers (what apply_patch merges; README "Modes"):
- UNets: attn1 of every BasicTransformerBlock at the merged levels (`max_downsample`), and attn2 / ff
  with merge_crossattn / merge_mlp;
- SD 3.5: a joint block's attention and its image-only attn2 (ff with merge_mlp);
- Flux: a double-stream block's joint attention (ff with merge_mlp); a single-stream block whole.

    python benchmarks/ceilings.py                          # every model, 1024,1536,2048 px
    python benchmarks/ceilings.py --models flux --sizes 1024
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tomesd.tools import archs, cli  # noqa: E402

Counts = Dict[str, Dict[str, int]]  # module name → {op: FLOPs} (a module's count includes its children's)


def count(model, kwargs) -> Tuple[Counts, Dict[str, int]]:
    """FLOPs per module of one call, and each attn1's query length (for a UNet's levels)."""
    lengths: Dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, name=name: lengths.__setitem__(
                 name, (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
             for name, m in model.named_modules() if name.endswith(".attn1")]
    with torch.no_grad(), FlopCounterMode(display=False, depth=64) as counter:
        model(**kwargs)
    for h in hooks:
        h.remove()
    root = type(model).__name__ + "."
    return ({k[len(root):] if k.startswith(root) else k: {str(op): n for op, n in v.items()}
             for k, v in counter.get_flop_counts().items()}, lengths)


def total(counts: Counts, name: str) -> int:
    return sum(counts.get(name, {}).values())


def sdpa(counts: Counts, name: str) -> int:
    """The attention core's FLOPs in module `name` (on the meta device SDPA runs its math form: two bmm)."""
    return sum(n for op, n in counts.get(name, {}).items() if "scaled_dot_product" in op or op == "aten.bmm")


def step(counts: Counts) -> int:
    return max(sum(v.values()) for v in counts.values())  # the root module's count


# --- models -----------------------------------------------------------------------------------------------

def unet(arch, height: int, width: int):
    from diffusers import UNet2DConditionModel

    c = arch.config
    with torch.device("meta"):
        model = UNet2DConditionModel(**c).eval()
        kw = dict(sample=torch.empty(2, c.get("in_channels", 4), height // 8, width // 8), timestep=torch.tensor(999),
                  encoder_hidden_states=torch.empty(2, arch.text_len, c["cross_attention_dim"]))
        if c.get("addition_embed_type") == "text_time":
            kw["added_cond_kwargs"] = dict(text_embeds=torch.empty(2, 1280), time_ids=torch.empty(2, 6))
    return model, kw


def transformer(arch, height: int, width: int):
    with torch.device("meta"):
        model = archs.build_transformer(arch).eval()
    batch = 1 if arch.family == "flux" else 2  # Flux: guidance-distilled; SD 3.5: a CFG pair
    return model, archs.transformer_inputs(arch, batch, height, width, torch.float32, "meta")


MODELS: Dict[str, Tuple[object, Callable, int]] = {  # name → (arch, builder, pixels per token side at /1)
    "sd15": (archs.SD15, unet, 8),
    "sdxl": (archs.SDXL, unet, 8),
    "sd3.5m": (archs.SD35M, transformer, 16),
    "flux": (archs.FLUX_DEV, transformer, 16),
}

# name → (model, mode, ratio, levels (UNets: merged downsamples), merge_mlp, merge_crossattn)
SETTINGS = [
    ("sd15", "default: tokens 0.5, /1", "tokens", 0.5, (1,), False, False),
    ("sd15", "tokens 0.75, /1", "tokens", 0.75, (1,), False, False),
    ("sd15", "tokens 0.5, /1 + /2", "tokens", 0.5, (1, 2), False, False),
    ("sdxl", "default: tokens 0.5, /2", "tokens", 0.5, (2,), False, False),
    ("sdxl", "tokens 0.75, /2", "tokens", 0.75, (2,), False, False),
    ("sdxl", "tokens 0.5, /2 + /4", "tokens", 0.5, (2, 4), False, False),
    ("sdxl", "tokens 0.5, /2 + /4, mlp + xattn", "tokens", 0.5, (2, 4), True, True),
    ("sdxl", "tokens 0.75, /2 + /4, mlp + xattn", "tokens", 0.75, (2, 4), True, True),
    ("sd3.5m", "tokens 0.5", "tokens", 0.5, (), False, False),
    ("sd3.5m", "tokens 0.5, mlp", "tokens", 0.5, (), True, False),
    ("sd3.5m", "tokens 0.75, mlp", "tokens", 0.75, (), True, False),
    ("flux", "kv 0.5 (today's default)", "kv", 0.5, (), False, False),
    ("flux", "tokens 0.5", "tokens", 0.5, (), False, False),
    ("flux", "tokens 0.5, mlp", "tokens", 0.5, (), True, False),
    ("flux", "tokens 0.75, mlp", "tokens", 0.75, (), True, False),
]


def merged_sublayers(model_name: str, counts: Counts, lengths: Dict[str, int], tokens1: int, levels, mlp: bool,
                     xattn: bool) -> List[str]:
    """The module names tokens mode runs on the merged tokens."""
    names = []
    if model_name in ("sd15", "sdxl"):
        for attn1, n in lengths.items():
            if round((tokens1 / n) ** 0.5) in levels:
                block = attn1[: -len(".attn1")]
                names += [attn1] + ([block + ".attn2"] if xattn else []) + ([block + ".ff"] if mlp else [])
        return names
    for name in counts:
        parts = name.split(".")
        if len(parts) != 2:
            continue
        if parts[0] == "single_transformer_blocks":
            names.append(name)  # whole (attention and MLP side by side on one sequence)
        elif parts[0] == "transformer_blocks":
            names += [name + ".attn"] + ([name + ".attn2"] if name + ".attn2" in counts else []) + \
                ([name + ".ff"] if mlp else [])
    return names


def ceilings(model_name: str, px: int) -> List[dict]:
    arch, build, cell = MODELS[model_name]
    model, kw = build(arch, px, px)
    full, lengths = count(model, kw)
    tokens1 = (px // cell) ** 2  # tokens at /1 (the UNet's finest level, a transformer's grid)
    base = step(full)
    rows = []
    for name, setting, mode, ratio, levels, mlp, xattn in SETTINGS:
        if name != model_name:
            continue
        image = tokens1 if model_name not in ("sd15", "sdxl") else None
        subs = merged_sublayers(model_name, full, lengths, tokens1, levels, mlp, xattn)
        if mode == "kv":  # the attention core's keys: merged image + text tokens, of image + text
            text = arch.text_len
            saved = sum(sdpa(full, s) * (1 - (image * (1 - ratio) + text) / (image + text)) for s in subs)
        else:
            narrow = round(px * (1 - ratio))
            if narrow % (cell * 8 if model_name in ("sd15", "sdxl") else cell):
                raise ValueError(f"{px} px × (1 − {ratio}) is no whole canvas for {model_name}")
            small, _ = count(*build(arch, px, narrow))
            saved = sum(total(full, s) - total(small, s) for s in subs)
        share = sum(total(full, s) for s in subs) / base
        rows.append(dict(model=model_name, px=px, setting=setting, merged_share=share, ceiling=base / (base - saved),
                         tflops_per_step=base / 1e12))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--sizes", type=cli.comma_list(int), default=(1024, 1536, 2048), help="square sides in px")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)}; expected some of {', '.join(MODELS)}")
    sizes = args.sizes
    if not sizes or any(s < 256 or s % 64 for s in sizes):
        p.error(f"--sizes: expected multiples of 64 from 256 up, got {','.join(map(str, sizes))}")
    rows = [r for m in models for px in sizes for r in ceilings(m, px)]
    print("| model | setting | " + " | ".join(f"{px} px: merged sub-layers' share / ceiling" for px in sizes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
    for m in models:
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == m):
            cells = {r["px"]: r for r in rows if r["model"] == m and r["setting"] == setting}
            print(f"| {m} | {setting} | " + " | ".join(
                f"{cells[px]['merged_share']:.0%} / {cells[px]['ceiling']:.2f}×" for px in sizes) + " |")
    unpatched = {(r["model"], r["px"]): r["tflops_per_step"] for r in rows}  # the same in every row of a (model, px)
    print("\nTFLOPs of one unpatched step (SD 1.5, SDXL, SD 3.5: a CFG batch of 2; Flux: 1): " + "; ".join(
        f"{m} " + ", ".join(f"{unpatched[m, px]:.1f}" for px in sizes) for m in models)
        + f" at {', '.join(map(str, sizes))} px")
    if args.json:
        cli.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
