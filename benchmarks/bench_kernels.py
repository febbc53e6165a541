"""Kernel benchmark: match + merge + unmerge, CUDA kernels vs the PyTorch path vs the reference algorithm.

The reference is tomesd 0.1.3's bipartite_soft_matching_random2d algorithm (benchmarks/tomesd013.py,
reimplemented from its description): split-gather of src/dst, a dense [S x D] score matrix, argsort of the best scores,
scatter_reduce(mean) + cat to merge, zeros + three scatters to unmerge.

  python benchmarks/bench_kernels.py --out bench-out            # fp16, batch 2, ratio 0.5, on cuda
  python benchmarks/bench_kernels.py --device cpu --sizes 1024x64 --iters 2   # smoke test, no GPU

Prints a table (ms per op, total, peak extra memory of matching, merge/unmerge bandwidth against a
device-to-device copy of x measured in the same run) and writes kernels.json to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from tomesd import matching, ops  # noqa: E402

import tomesd013  # noqa: E402  (the reference algorithm, next to this script)

DEFAULT_SIZES = ("4096x320", "16384x320", "65536x320", "4096x640", "16384x640")


# ---- timing ----

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_mib(fn, device):
    if device.type != "cuda":
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def bench_size(n, c, batch, ratio, dtype, device, iters):
    side = int(math.isqrt(n))
    h, w = side, n // side
    dst_idx, src_idx = matching.partition(h, w, 2, 2, torch.tensor(1234), device)
    r = min(int(n * ratio), len(src_idx))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, n, c, device=device, generator=g).to(dtype)
    copy_dst = torch.empty_like(x)
    copy_ms = timed(lambda: copy_dst.copy_(x), device, iters)
    row = {"N": n, "C": c, "B": batch, "r": r, "dtype": str(dtype).replace("torch.", ""), "copy_ms": copy_ms}
    es = x.element_size()
    merge_bytes = batch * (n + (n - r)) * c * es
    copy_bytes = 2 * batch * n * c * es
    row["copy_GBps"] = copy_bytes / copy_ms / 1e6

    paths = {"torch": (matching.build_plan, matching.merge, matching.unmerge)}
    if device.type == "cuda":
        if ops.cuda_refusal(x):
            raise SystemExit(f"CUDA kernels unavailable: {ops.cuda_refusal(x)}")
        paths["cuda"] = (ops.build_plan, ops.merge, ops.unmerge)
    paths["reference"] = (tomesd013.match, lambda t, st: tomesd013.merge(t, dst_idx, src_idx, st),
                          lambda t, st: tomesd013.unmerge(t, dst_idx, src_idx, st, n))
    for name, (build, merge, unmerge) in paths.items():
        plan = build(x, dst_idx, src_idx, r)
        y = merge(x, plan)
        t_match = timed(lambda: build(x, dst_idx, src_idx, r), device, iters)
        t_merge = timed(lambda: merge(x, plan), device, iters)
        t_unmerge = timed(lambda: unmerge(y, plan), device, iters)
        row[name] = {"match_ms": t_match, "merge_ms": t_merge, "unmerge_ms": t_unmerge,
                     "total_ms": t_match + t_merge + t_unmerge,
                     "match_peak_extra_MiB": peak_extra_mib(lambda: build(x, dst_idx, src_idx, r), device),
                     "merge_GBps": merge_bytes / t_merge / 1e6, "unmerge_GBps": merge_bytes / t_unmerge / 1e6}
    return row


def table(rows):
    head = f"{'N x C':>12} {'path':>9} {'match':>8} {'merge':>8} {'unmerge':>8} {'total':>8} {'vs ref':>7} {'match MiB':>10} {'merge GB/s':>11} {'unm GB/s':>9} {'copy GB/s':>9}"
    lines = [head, "-" * len(head)]
    for row in rows:
        ref_total = row["reference"]["total_ms"]
        for path in ("cuda", "torch", "reference"):
            if path not in row:
                continue
            p = row[path]
            lines.append(f"{row['N']:>6}x{row['C']:<5} {path:>9} {p['match_ms']:8.3f} {p['merge_ms']:8.3f} {p['unmerge_ms']:8.3f} "
                         f"{p['total_ms']:8.3f} {p['total_ms'] / ref_total:7.2f} {p['match_peak_extra_MiB']:10.1f} "
                         f"{p['merge_GBps']:11.1f} {p['unmerge_GBps']:9.1f} {row['copy_GBps']:9.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="NxC, e.g. 4096x320")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="directory for kernels.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu for a smoke test of the torch and reference paths")
    dtype = getattr(torch, args.dtype)
    rows = []
    for size in args.sizes:
        n, c = (int(v) for v in size.lower().split("x"))
        rows.append(bench_size(n, c, args.batch, args.ratio, dtype, device, args.iters))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "ratio": args.ratio}
    print(f"# {meta}")
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
