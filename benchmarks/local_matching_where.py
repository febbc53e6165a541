"""Where local matching (match_window = k) loses partners: the photos reference model at its largest canvas.

Runs the photos pipeline unpatched at --size px and keeps the input of its first highest-resolution
transformer layer (the tokens ToMe's matching compares) at the denoising calls in --steps. For each kept
input (conditional row), with tomesd's own dst / src split (2×2 cells, one random dst each), it finds each
src token's most similar dst by cosine similarity among all dst (global matching) and among the dst of the
k × k cells around it (local), takes the r = ratio · N most similar src as tomesd does, and reports:

- the mean / 5th percentile of the merged src tokens' similarity to their dst (how alike merged tokens are),
- how many of global matching's merged src are also merged locally, and how many src merge locally with a
  similarity below global matching's lowest merged one ("forced" merges: the src had to take a worse partner
  than any global merge, because its window has none better),
- a figure (--png): per token, how much similarity its partner lost (global best − local best), and the
  forced merges, for each window.

    python benchmarks/local_matching_where.py --size 128 --ratio 0.7 --windows 3,5,9,17 --png where.png --out where.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tomesd import keys, matching  # noqa: E402
from tomesd.tools import models  # noqa: E402


def capture(size: int, prompt: str, steps: int, keep: List[int], seed: int) -> Dict[int, torch.Tensor]:
    """{denoising call: input [N, C] of the first highest-resolution transformer layer, conditional row}."""
    from diffusers.models.attention import BasicTransformerBlock

    pipe = models.load_pipeline("photos", dtype=torch.float32, device="cpu")
    layers = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    sizes: Dict[int, int] = {}
    probe = [layer.register_forward_pre_hook(
        lambda m, a, k: sizes.__setitem__(id(m), (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
        for layer in layers]
    pipe(prompt, height=8, width=8, num_inference_steps=1, generator=torch.Generator().manual_seed(seed))
    for h in probe:
        h.remove()
    first = next(layer for layer in layers if sizes[id(layer)] == max(sizes.values()))
    seen: Dict[int, torch.Tensor] = {}
    calls = [-1]

    def on_unet(module, args):
        calls[0] += 1

    def on_layer(module, args, kwargs):
        if calls[0] in keep:
            seen[calls[0]] = (args[0] if args else kwargs["hidden_states"])[-1].detach().clone()

    pipe.unet.register_forward_pre_hook(on_unet)
    first.register_forward_pre_hook(on_layer, with_kwargs=True)
    pipe(prompt, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    return seen


def analyse(x: torch.Tensor, side: int, ratio: float, windows: List[int], seed: int):
    N, C = x.shape
    dst, src = matching.partition(side, side, 2, 2, keys.step_key(keys.base_key(seed), 500, "cpu"), "cpu")
    m = torch.nn.functional.normalize(x, dim=-1)
    scores = m[src] @ m[dst].T  # [S, D]: small enough at 16k tokens
    r = min(int(N * ratio), len(src))
    cell = lambda idx: torch.stack([(idx // side) // 2, (idx % side) // 2], -1)  # noqa: E731
    cs, cd = cell(src), cell(dst)
    gap = (cs[:, None, :] - cd[None, :, :]).abs().amax(-1)  # [S, D] cell distance (Chebyshev)
    best_g, _ = scores.max(-1)
    merged_g = best_g.argsort(descending=True)[:r]
    floor = best_g[merged_g].min()
    rows = [dict(window="global", mean_sim=best_g[merged_g].mean().item(),
                 p5_sim=best_g[merged_g].quantile(0.05).item(), same_as_global=1.0, forced=0)]
    maps = {}
    for k in windows:
        best_l, _ = scores.masked_fill(gap > k // 2, -2.0).max(-1)
        merged_l = best_l.argsort(descending=True)[:r]
        forced = int((best_l[merged_l] < floor).sum())
        same = len(set(merged_l.tolist()) & set(merged_g.tolist())) / r
        rows.append(dict(window=f"k={k}", mean_sim=best_l[merged_l].mean().item(),
                         p5_sim=best_l[merged_l].quantile(0.05).item(), same_as_global=same, forced=forced))
        lost = torch.zeros(N)
        lost[src] = (best_g - best_l).clamp_min(0)
        forced_map = torch.zeros(N)
        forced_map[src[merged_l[best_l[merged_l] < floor]]] = 1
        maps[k] = (lost.view(side, side), forced_map.view(side, side))
    return rows, maps, r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--prompt", default="chelsea")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the pipeline call")
    p.add_argument("--keep", default="1,5,9", help="denoising calls whose tokens are analysed")
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--windows", default="3,5,9,17")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png")
    p.add_argument("--out")
    args = p.parse_args()
    windows = [int(v) for v in args.windows.split(",")]
    keep = [int(v) for v in args.keep.split(",")]
    seen = capture(args.size, args.prompt, args.steps, keep, args.seed)
    side = args.size  # pixel-space model: the finest level is the canvas itself
    report = {}
    print(f"photos model, {args.size} px ({side * side:,} tokens), prompt {args.prompt!r}, ratio {args.ratio}, "
          f"2x2 cells; similarity = cosine of the layer input")
    print("| call | matching | merged src: mean similarity | 5th percentile | also merged globally | forced merges |")
    print("| --- | --- | --- | --- | --- | --- |")
    figures = []
    for call, x in sorted(seen.items()):
        rows, maps, r = analyse(x, side, args.ratio, windows, args.seed)
        report[call] = rows
        for row in rows:
            print(f"| {call} | {row['window']} | {row['mean_sim']:.3f} | {row['p5_sim']:.3f} | "
                  f"{row['same_as_global']:.1%} | {row['forced']:,} of {r:,} |")
        figures.append((call, maps))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(args=vars(args), calls=report), fh, indent=1)
    if args.png:
        try:
            import matplotlib
        except ImportError:
            sys.exit("--png needs matplotlib: pip install matplotlib")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(figures), 2 * len(windows), figsize=(2.2 * 2 * len(windows), 2.4 * len(figures)),
                                 squeeze=False)
        for i, (call, maps) in enumerate(figures):
            for j, k in enumerate(windows):
                lost, forced = maps[k]
                axes[i, 2 * j].imshow(lost, cmap="magma", vmin=0, vmax=0.3)
                axes[i, 2 * j].set_title(f"call {call}, k={k}: lost sim.", fontsize=7)
                axes[i, 2 * j + 1].imshow(forced, cmap="gray_r", vmin=0, vmax=1)
                axes[i, 2 * j + 1].set_title(f"k={k}: forced merges", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.png, dpi=75)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
