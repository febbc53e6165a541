"""CPU benchmark of the PyTorch path against the reference (tomesd 0.1.3's algorithm).

1. Ops at [B, N, C] = [2, 4096, 320], ratio 0.5, 64×64 grid: matching (plan), merge, unmerge —
   tomesd's slot map against the reference's closures (split gathers, dense scores, argsort,
   scatter_reduce + cat; zeros + three scatters to unmerge), from benchmarks/tomesd013.py.
2. A whole UNet forward whose top level is SD 1.5's (C=320 at a 64×64 latent, batch 2, 768-dim text):
   no ToMe, tomesd, and — with --reference pointing at the tomesd 0.1.3 wheel or package directory —
   tomesd 0.1.3 itself, loaded under another module name.

    pip download --no-deps -d /tmp/ref tomesd==0.1.3
    python benchmarks/bench_core.py --reference /tmp/ref/tomesd-0.1.3-py3-none-any.whl

Medians over --reps runs, the variants interleaved round by round.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tomesd  # noqa: E402
from tomesd import matching, ops  # noqa: E402

import tomesd013  # noqa: E402  (the reference algorithm, next to this script)


def median_ms(fns: dict, reps: int) -> dict:
    """Median wall time in ms of each callable, interleaved round by round after one warm-up."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            start = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_ops(reps: int, B=2, h=64, w=64, C=320, ratio=0.5):
    torch.manual_seed(0)
    x = torch.randn(B, h * w, C)
    N = h * w
    r = int(N * ratio)
    ref_m, ref_u = tomesd013.closures(x, w, h, 2, 2, r)
    dst_idx, src_idx = matching.partition(h, w, 2, 2, None, "cpu")
    plan = ops.build_plan(x, dst_idx, src_idx, r)
    merged_ref, merged = ref_m(x), ops.merge(x, plan)
    # Same result up to row order: compare the unmerged round trips.
    torch.testing.assert_close(ref_u(merged_ref), ops.unmerge(merged, plan))

    def ours_match():
        d, s = matching.partition(h, w, 2, 2, None, "cpu")
        return ops.build_plan(x, d, s, r)

    t = median_ms(
        {
            "ref_match": lambda: tomesd013.closures(x, w, h, 2, 2, r),
            "ours_match": ours_match,
            "ref_merge": lambda: ref_m(x),
            "ours_merge": lambda: ops.merge(x, plan),
            "ref_unmerge": lambda: ref_u(merged_ref),
            "ours_unmerge": lambda: ops.unmerge(merged, plan),
        },
        reps,
    )
    rows = []
    for op in ("match", "merge", "unmerge"):
        rows.append(dict(op=op, reference_ms=t[f"ref_{op}"], tomesd_ms=t[f"ours_{op}"]))
    rows.append(dict(op="total", reference_ms=sum(r_["reference_ms"] for r_ in rows), tomesd_ms=sum(r_["tomesd_ms"] for r_ in rows)))
    for row in rows:
        row["speedup"] = row["reference_ms"] / row["tomesd_ms"]
    return rows


SD15_TOP_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def load_reference(path: str):
    """Import tomesd 0.1.3 from a wheel or a directory holding its `tomesd/` package, as `tomesd_ref`."""
    if path.endswith(".whl"):
        target = tempfile.mkdtemp(prefix="tomesd013_")
        zipfile.ZipFile(path).extractall(target)
        path = target
    pkg = os.path.join(path, "tomesd")
    spec = importlib.util.spec_from_file_location("tomesd_ref", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tomesd_ref"] = module
    spec.loader.exec_module(module)
    return module


def bench_unet(reps: int, reference_path: str | None, ratio=0.5):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unets = {"no ToMe": UNet2DConditionModel(**SD15_TOP_UNET).eval()}
    unets["tomesd"] = UNet2DConditionModel(**SD15_TOP_UNET).eval()
    tomesd.apply_patch(unets["tomesd"], ratio=ratio)
    if reference_path:
        ref = load_reference(reference_path)
        unets["tomesd 0.1.3"] = UNet2DConditionModel(**SD15_TOP_UNET).eval()
        ref.apply_patch(unets["tomesd 0.1.3"], ratio=ratio)
    for u in unets.values():
        u.load_state_dict(unets["no ToMe"].state_dict())
    sample = torch.randn(2, 4, 64, 64)
    text = torch.randn(2, 77, 768)

    def call(u):
        def f():
            with torch.no_grad():
                return u(sample, 500, encoder_hidden_states=text).sample

        return f

    t = median_ms({k: call(u) for k, u in unets.items()}, reps)
    return [dict(variant=k, median_ms=v, vs_no_tome=t["no ToMe"] / v) for k, v in t.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="timed runs per op (default 15)")
    parser.add_argument("--unet-reps", type=int, default=5, help="timed UNet forwards per variant (default 5)")
    parser.add_argument("--reference", help="tomesd 0.1.3 wheel or directory, to time it in the UNet forward")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", help="write results JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=os.cpu_count())
    print(f"torch {env['torch']}, {env['threads']} threads")
    op_rows = bench_ops(args.reps)
    print("\nOps at [2, 4096, 320], ratio 0.5, 64x64 grid, fp32 CPU (median ms)")
    print(f"{'op':<8} {'reference':>10} {'tomesd':>10} {'speedup':>8}")
    for row in op_rows:
        print(f"{row['op']:<8} {row['reference_ms']:>10.2f} {row['tomesd_ms']:>10.2f} {row['speedup']:>7.2f}x")
    unet_rows = bench_unet(args.unet_reps, args.reference)
    print("\nUNet forward, SD 1.5 top level (C=320, 64x64 latent, batch 2), ratio 0.5, fp32 CPU (median ms)")
    print(f"{'variant':<14} {'median_ms':>10} {'speedup vs no ToMe':>20}")
    for row in unet_rows:
        print(f"{row['variant']:<14} {row['median_ms']:>10.1f} {row['vs_no_tome']:>19.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, ops=op_rows, unet=unet_rows), f, indent=2)


if __name__ == "__main__":
    main()
