"""Per-step speed of token merging on the MMDiT architectures (SD 3.5 Medium, Flux.1 dev), random weights.

Every block of these runs at the full token grid, so a model cut to a few blocks (`--layers`) has the
per-block cost, and ToMe's per-block speed-up, of the full model in a fraction of the time and memory
(the full Flux.1 dev does not fit a 24 GiB CPU machine in fp32). Settings are timed round-robin
(one step of each, repeated) so that machine load hits all alike; the table shows medians, the
speed-up against no ToMe measured in the same run, and the share of the unpatched step spent inside
F.scaled_dot_product_attention.

    python benchmarks/bench_mmdit.py --arch sd3 --layers 2 --resolutions 512,768 --ratios 0.3,0.5,0.7
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tomesd
from tomesd.tools import cli
from tomesd.tools.archs import TRANSFORMER_ARCHS, build_transformer, transformer_inputs

SIZE_STEP = 16  # image sides: multiples of the VAE's 8 × the transformers' patch size 2


class AttentionTimer(TorchFunctionMode):
    """Seconds spent inside F.scaled_dot_product_attention while active."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        return out


def step(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - start


def main(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(TRANSFORMER_ARCHS), default="sd3")
    parser.add_argument("--layers", type=int, default=2, help="blocks of each kind to keep (default 2)")
    parser.add_argument("--resolutions", type=cli.comma_list(int), default=(512, 768),
                        help=f"image sides in px, multiples of {SIZE_STEP}")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--modes", default="tokens,kv", help="modes to time (Flux: kv only)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    bad = [px for px in args.resolutions if px < SIZE_STEP or px % SIZE_STEP]
    if bad or not args.resolutions:
        parser.error(f"--resolutions: image sides must be multiples of {SIZE_STEP} px (the VAE's 8 × patch size 2), "
                     f"got {', '.join(map(str, bad)) or 'none'}")
    arch = TRANSFORMER_ARCHS[args.arch]
    modes = [m for m in args.modes.split(",") if not (arch.family == "flux" and m == "tokens")]
    torch.manual_seed(0)
    model = build_transformer(arch, layers=args.layers).eval()
    settings = [("none", None, 0.0)] + [(m, m, float(r)) for m in modes for r in args.ratios.split(",")]
    rows = []
    for px in args.resolutions:
        inputs = transformer_inputs(arch, args.batch, px, px, torch.float32, "cpu")
        times = {s: [] for s in settings}
        timer = AttentionTimer()
        step(model, inputs)  # warm-up
        for _ in range(args.repeats):
            for name, mode, ratio in settings:
                if mode is None:
                    tomesd.remove_patch(model)
                    with timer:
                        times[(name, mode, ratio)].append(step(model, inputs))
                else:
                    tomesd.apply_patch(model, ratio=ratio, mode=mode, seed=0)
                    times[(name, mode, ratio)].append(step(model, inputs))
        tomesd.remove_patch(model)
        base = statistics.median(times[settings[0]])
        attn_share = timer.seconds / sum(times[settings[0]])
        for (name, mode, ratio), ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(arch=arch.name, layers=args.layers, px=px, mode=name, ratio=ratio, ms=1000 * med,
                             speedup=base / med, attention_share=attn_share if mode is None else None))
    print(f"{arch.description}; cut to {args.layers} block(s) of each kind; batch {args.batch}; CPU fp32, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} round-robin steps")
    print(f"{'px':>5} {'mode':>6} {'ratio':>5} {'ms/step':>9} {'speedup':>8} {'attn share':>10}")
    for r in rows:
        share = f"{100 * r['attention_share']:.0f}%" if r["attention_share"] is not None else ""
        print(f"{r['px']:>5} {r['mode']:>6} {r['ratio']:>5.1f} {r['ms']:>9.0f} {r['speedup']:>7.2f}x {share:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
