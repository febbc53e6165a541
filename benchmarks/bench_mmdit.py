"""Per-step speed-up of token merging on the real SD 3.5 Medium and Flux.1 dev architectures (random
weights), composed from a model cut to a few blocks of each kind.

Every block of these transformers runs at the full token grid, so blocks of one kind cost the same: the
model is cut to --layers blocks of each kind (Flux: double- and single-stream; SD 3.5 Medium:
dual-attention blocks, plain joint blocks and the last, context-pre-only block), and each step of the cut
model is split, with hooks on its blocks (CUDA events on a GPU), into the blocks' times (less the plan
builds made inside them), the plan builds (tomesd.patch.PlanProvider.build, the documented seam) and the
rest (embeddings, positions, output layers). The full model's step is then

    step = rest + Σ_kind L_kind · block_kind + builds · plan,

with L_kind the full model's blocks of that kind (Flux.1 dev: 19 + 38; SD 3.5 Medium: 13 dual + 10 + 1),
and builds the full model's plan builds per call (one with share_plan, else the cut model's builds per
block times the full model's blocks; divided by k with plan_every=k, whose reuse across the calls of a
sampling run a single timed step cannot show). The blocks' share of the unpatched step gives the ceiling: no
setting that merges in the blocks can beat 1 / (1 − share). --check-full PX times one whole unpatched
step of the full model at PX to check the composition (the full Flux.1 dev needs ~24 GB in bf16).

Settings are timed in interleaved rounds (every setting once per round, in turn; patched before and
unpatched after each step, untimed) so that machine load hits all alike; medians, and each speed-up's
band (lowest and highest per-round value). Defaults: Flux — today's default (kv 0.5), tokens mode with
and without share_plan, local matching, prop_attn, merge_mlp; SD 3.5 — the same in tokens mode, and kv.
--setting KEY=V,... (repeatable), or the grid --modes × --ratios, replaces them; every setting is applied
once before any timing.

    python benchmarks/bench_mmdit.py --arch flux --layers 2 --resolutions 1024,1536,2048 --device cuda --dtype bf16
    python benchmarks/bench_mmdit.py --arch sd3 --layers 3 --resolutions 1024 --setting mode=tokens,ratio=0.6
    python benchmarks/bench_mmdit.py --arch flux --toy --layers 1 --resolutions 128 --rounds 1   # a smoke test
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from functools import partial
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd.patch import PlanProvider  # noqa: E402
from tomesd.tools import cli, timing  # noqa: E402
from tomesd.tools.archs import TRANSFORMER_ARCHS, TransformerArch, build_transformer, transformer_inputs  # noqa: E402

SETTINGS = {  # family → (label, apply_patch keywords); the first is today's default on that family
    "flux": (("kv 0.5 (default)", dict(ratio=0.5)),
             ("tokens 0.5", dict(mode="tokens", ratio=0.5)),
             ("tokens 0.5 share", dict(mode="tokens", ratio=0.5, share_plan=True)),
             ("tokens 0.5 share k=3", dict(mode="tokens", ratio=0.5, share_plan=True, match_window=3)),
             ("tokens 0.7 prop share k=3", dict(mode="tokens", ratio=0.7, prop_attn=True, share_plan=True,
                                                match_window=3)),
             ("tokens 0.5 prop mlp share k=3", dict(mode="tokens", ratio=0.5, prop_attn=True, merge_mlp=True,
                                                    share_plan=True, match_window=3))),
    "sd3": (("tokens 0.5 (default)", dict(ratio=0.5)),
            ("tokens 0.5 share", dict(ratio=0.5, share_plan=True)),
            ("tokens 0.5 share k=3", dict(ratio=0.5, share_plan=True, match_window=3)),
            ("tokens 0.7 prop share k=3", dict(ratio=0.7, prop_attn=True, share_plan=True, match_window=3)),
            ("tokens 0.5 prop mlp share k=3", dict(ratio=0.5, prop_attn=True, merge_mlp=True, share_plan=True,
                                                   match_window=3)),
            ("kv 0.5", dict(mode="kv", ratio=0.5))),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOY = {  # family → the config keys a toy shrinks (a smoke test's model: real depth, tiny width)
    "flux": dict(in_channels=16, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    "sd3": dict(in_channels=4, out_channels=4, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=32),
}


def kind_of(block) -> str:
    """A block's kind: Flux "double" / "single"; SD 3 "dual" (with attn2), "last" (context pre-only), "joint"."""
    if type(block).__name__ == "FluxTransformerBlock":
        return "double"
    if type(block).__name__ == "FluxSingleTransformerBlock":
        return "single"
    if getattr(block, "attn2", None) is not None:
        return "dual"
    return "last" if getattr(block, "context_pre_only", False) else "joint"


def full_counts(arch: TransformerArch) -> Dict[str, int]:
    """Blocks of each kind in the full model."""
    c = arch.config
    if arch.family == "flux":
        return {"double": c["num_layers"], "single": c["num_single_layers"]}
    dual = len([i for i in c.get("dual_attention_layers", ()) if i < c["num_layers"] - 1])
    return {"dual": dual, "joint": c["num_layers"] - 1 - dual, "last": 1}


def cut_model(arch: TransformerArch, layers: int):
    """The model cut to `layers` blocks of each kind (SD 3: `layers` blocks, the first third dual-attention
    ones, the last context-pre-only), random weights."""
    if arch.family == "sd3":
        config = dict(arch.config, num_layers=layers, dual_attention_layers=tuple(range(max(1, layers // 3))))
        return build_transformer(dataclasses.replace(arch, config=config))
    return build_transformer(arch, layers=layers)


class Clock:
    """Time marks: perf_counter on a CPU; CUDA events on a GPU (read after a synchronize, at the step's end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class StepRecorder:
    """Hooks on the blocks and a wrapper of PlanProvider.build that mark, for each step: the blocks' calls
    (kind, start, end) and the plan builds (start, end); `split()` gives (step, {kind: [block seconds less
    its builds]}, [build seconds])."""

    def __init__(self, model, clock: Clock):
        self.clock, self.marks, self.builds, self.handles = clock, [], [], []
        for block in [*getattr(model, "transformer_blocks", []), *getattr(model, "single_transformer_blocks", [])]:
            self.handles.append(block.register_forward_pre_hook(partial(self.enter, kind_of(block))))
            self.handles.append(block.register_forward_hook(self.leave))
        real = PlanProvider.build

        def timed(provider, request):
            start = self.clock.mark()
            plan = real(provider, request)
            self.builds.append((start, self.clock.mark(), len(self.marks)))
            return plan

        self.real, PlanProvider.build = real, timed

    def enter(self, kind: str, module, args) -> None:
        self.marks.append([kind, self.clock.mark(), None])

    def leave(self, module, args, output) -> None:
        self.marks[-1][2] = self.clock.mark()

    def step(self, model, inputs) -> Tuple[float, Dict[str, List[float]], List[float]]:
        self.marks, self.builds = [], []
        with torch.inference_mode():
            start = self.clock.mark()
            model(**inputs)
            end = self.clock.mark()
        self.clock.sync()
        builds = [(self.clock.seconds(a, b), i - 1) for a, b, i in self.builds]
        blocks: Dict[str, List[float]] = {}
        for i, (kind, a, b) in enumerate(self.marks):
            inside = sum(s for s, j in builds if j == i)
            blocks.setdefault(kind, []).append(self.clock.seconds(a, b) - inside)
        return self.clock.seconds(start, end), blocks, [s for s, _ in builds]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        PlanProvider.build = self.real


class AttentionTimer(TorchFunctionMode):
    """Seconds inside F.scaled_dot_product_attention while active (an untimed extra step: the mode's own
    overhead stays out of the timed rounds)."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock, self.spans = clock, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        start = self.clock.mark()
        out = func(*args, **(kwargs or {}))
        self.spans.append((start, self.clock.mark()))
        return out


def compose(rest: float, blocks: Dict[str, float], plan: float, builds: float, counts: Dict[str, int]) -> float:
    """Seconds of a full-model step: rest + Σ_kind L_kind · block_kind + builds · plan."""
    return rest + sum(counts[k] * blocks[k] for k in counts) + builds * plan


def measure(model, inputs, settings, rounds: int, warmup: bool, clock: Clock, counts: Dict[str, int], say):
    """Interleaved rounds of every setting: per setting the medians of the cut model's step, rest, blocks
    per kind and plan build, the full-model builds per call and the composed full step (per round too)."""
    rec = StepRecorder(model, clock)
    per: Dict[str, List[tuple]] = {label: [] for label, _ in settings}
    try:
        for k in range(-1 if warmup else 0, rounds):
            for label, params in settings:
                if params is not None:
                    tomesd.apply_patch(model, seed=0, **params)
                got = rec.step(model, inputs)
                tomesd.remove_patch(model)
                if k >= 0:
                    per[label].append(got)
            say(f"round {k + 1}/{rounds} done" if k >= 0 else "warm-up done")
    finally:
        rec.close()
    cut_blocks = {kind: len(v) for kind, v in per[settings[0][0]][0][1].items()}
    out = {}
    for label, params in settings:
        runs = per[label]
        step = [s for s, _, _ in runs]
        rest = [s - sum(sum(v) for v in b.values()) - sum(p) for s, b, p in runs]
        kinds = {kind: [statistics.mean(b[kind]) for _, b, _ in runs] for kind in cut_blocks}
        plans = [statistics.mean(p) if p else 0.0 for _, _, p in runs]
        per_block = len(runs[0][2]) / sum(cut_blocks.values())
        builds = len(runs[0][2]) if (params or {}).get("share_plan") else per_block * sum(counts.values())
        builds /= (params or {}).get("plan_every", 1)  # each timed step builds; a sampling run reuses k − 1 calls
        full = [compose(rest[i], {kd: kinds[kd][i] for kd in kinds}, plans[i], builds, counts)
                for i in range(len(runs))]
        out[label] = dict(params=params, cut_step_s=statistics.median(step), rest_s=statistics.median(rest),
                          block_s={kd: statistics.median(v) for kd, v in kinds.items()},
                          plan_s=statistics.median(plans),
                          builds_per_call=builds, full_step_s=statistics.median(full), full_rounds=full)
    return out


def attention_share(model, inputs, clock: Clock) -> float:
    """Share of an unpatched cut-model step spent inside SDPA (one extra, untimed-for-speed step)."""
    timer = AttentionTimer(clock)
    with torch.inference_mode(), timer:
        start = clock.mark()
        model(**inputs)
        end = clock.mark()
    clock.sync()
    return sum(clock.seconds(a, b) for a, b in timer.spans) / clock.seconds(start, end)


def full_step(arch: TransformerArch, inputs, device, dtype, clock: Clock) -> float:
    """Seconds of one whole unpatched step of the full model (after a warm-up call)."""
    torch.manual_seed(0)
    model = build_transformer(arch).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        model(**inputs)
        start = clock.mark()
        model(**inputs)
        end = clock.mark()
    clock.sync()
    return clock.seconds(start, end)


def parse(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(TRANSFORMER_ARCHS), default="flux")
    p.add_argument("--layers", type=cli.positive, default=None, help="blocks of each kind in the cut model "
                   "(default: Flux 2, SD 3.5 3 — one dual-attention, one plain, the last)")
    p.add_argument("--resolutions", type=cli.comma_list(int), default=(1024, 1536, 2048), help="square sides in px")
    p.add_argument("--setting", type=cli.setting, action="append", help="KEY=V,... apply_patch keywords of one "
                   "setting (repeatable; replaces the defaults)")
    p.add_argument("--modes", type=cli.values(), help="with --ratios: the grid of modes × ratios instead of the "
                   "default settings (default modes: tokens,kv)")
    p.add_argument("--ratios", type=cli.values(float), help="with --modes (or alone): the grid's ratios")
    p.add_argument("--rounds", "--repeats", type=cli.positive, default=3)
    p.add_argument("--no-warmup", action="store_true", help="no untimed round first")
    p.add_argument("--batch", type=cli.positive, help="default: Flux 1 (guidance-distilled), SD 3.5 2 (CFG)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on a CPU")
    p.add_argument("--check-full", type=cli.comma_list(int), default=(), help="px at which one whole unpatched "
                   "step of the full model is timed too")
    p.add_argument("--toy", action="store_true", help="the architecture at a tiny width (smoke tests; labelled TOY)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    arch = TRANSFORMER_ARCHS[args.arch]
    if args.toy:
        arch = dataclasses.replace(arch, config=dict(arch.config, **TOY[arch.family]), text_len=8, toy=True,
                                   description="TOY: " + arch.description + " at a tiny width")
    args.layers = args.layers or (2 if arch.family == "flux" else 3)
    if arch.family == "sd3" and args.layers < 3:
        p.error("--layers: SD 3.5 needs at least 3 blocks (dual-attention, plain, last) to compose a whole step")
    bad = [px for px in (*args.resolutions, *args.check_full) if px < 16 or px % 16]
    if bad or not args.resolutions:
        p.error(f"--resolutions / --check-full: sides must be positive multiples of 16 px, got {bad or 'none'}")
    problem = cli.cuda_problem(args.device)
    if problem:
        p.error(problem)
    args.device = torch.device(cli.default_device(args.device))
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]
    args.batch = args.batch or (1 if arch.family == "flux" else 2)
    if args.setting and (args.modes or args.ratios):
        p.error("--setting and --modes / --ratios: give whole settings or a grid, not both")
    if args.modes and not args.ratios:
        p.error("--modes: give --ratios too")
    if args.ratios:
        settings = [(f"{mode} {ratio:g}", dict(mode=mode, ratio=ratio)) for mode in args.modes or ("tokens", "kv")
                    for ratio in args.ratios]
    elif args.setting:
        settings = [(cli.setting_label(s), s) for s in args.setting]
    else:
        settings = list(SETTINGS[arch.family])
    return p, args, arch, [("no ToMe", None)] + settings


def main(argv=None) -> int:
    p, args, arch, settings = parse(argv)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    torch.manual_seed(0)
    model = cut_model(arch, args.layers).to(device=args.device, dtype=args.dtype).eval()
    try:
        cli.check_settings(model, [s for _, s in settings[1:]])
    except (ValueError, TypeError) as error:
        p.error(cli.error_line(error))
    counts, clock = full_counts(arch), Clock(args.device)
    result: Dict[str, Any] = dict(arch=arch.name, description=arch.description, toy=arch.toy, layers=args.layers,
                                  full_blocks=counts, batch=args.batch, dtype=str(args.dtype),
                                  env=cli.environment(str(args.device)), load_before=timing.load_average(), px={})
    for warning in timing.load_warnings(timing.load_average(), torch.get_num_threads()):
        say("warning: " + warning)
    for px in args.resolutions:
        inputs = transformer_inputs(arch, args.batch, px, px, args.dtype, args.device)
        rows = measure(model, inputs, settings, args.rounds, not args.no_warmup, clock, counts,
                       lambda t: say(f"{px} px: {t} (load {timing.load_average()})"))
        base = rows["no ToMe"]
        share = sum(counts[k] * base["block_s"][k] for k in counts) / base["full_step_s"]
        entry: Dict[str, Any] = dict(rows=rows, blocks_share=share, ceiling=1 / max(1e-9, 1 - share),
                                     attention_share=attention_share(model, inputs, clock))
        for label, row in rows.items():
            row["speedup"] = base["full_step_s"] / row["full_step_s"]
            row["cut_speedup"] = base["cut_step_s"] / row["cut_step_s"]
            row.update(timing.noise_band(base["full_rounds"], row["full_rounds"]))
        if px in args.check_full:
            entry["whole_step_s"] = full_step(arch, inputs, args.device, args.dtype, clock)
        result["px"][px] = entry
        report(arch, args, px, entry)
    if args.json:
        cli.write_json(args.json, dict(result, load_after=timing.load_average()))
    return 0


def report(arch, args, px: int, entry: Dict[str, Any]) -> None:
    rows, kinds = entry["rows"], list(full_counts(arch))
    base = rows["no ToMe"]
    print(f"\n{arch.description}; {px} px, batch {args.batch}, {str(args.dtype).replace('torch.', '')}, "
          f"{args.device}; composed from {args.layers} block(s) of each kind; medians of {args.rounds} interleaved "
          f"round(s)")
    print(f"unpatched: the blocks are {entry['blocks_share']:.0%} of a step (ceiling {entry['ceiling']:.2f}×), "
          f"attention {entry['attention_share']:.0%} of the cut model's step; composed step "
          f"{base['full_step_s']:.3f} s" + (f", whole step measured {entry['whole_step_s']:.3f} s"
                                            if "whole_step_s" in entry else ""))
    head = ["setting", "step (s)", "speed-up", "band", *[f"{k} block" for k in kinds], "plans/call", "plan (ms)"]
    lines = [head]
    for label, row in rows.items():
        band = ("-" if row["speedup_min"] is None else f"{row['speedup_min']:.2f}–{row['speedup_max']:.2f}×")
        lines.append([label, f"{row['full_step_s']:.3f}", f"{row['speedup']:.2f}×", band,
                      *[f"{base['block_s'][k] / row['block_s'][k]:.2f}×" for k in kinds],
                      f"{row['builds_per_call']:g}", f"{1000 * row['plan_s']:.1f}"])
    print("\n".join(cli.align(lines)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
