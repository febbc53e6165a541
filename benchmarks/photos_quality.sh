#!/usr/bin/env bash
# Issue 18: quality of the issue-11 mode / plan settings on the photos reference model (tomesd.quality
# --model photos), one results.json per sub-grid and size under ${1:-photos-quality}/<sub-grid>/<size>px/.
# Ranked against the digits model's issue-11 results by benchmarks/photos_ranks.py.
# Samples per size: benchmarks/photos_grid.sh.
# Sub-grids named after the output directory run alone ($2 ...).
set -euo pipefail
out=${1:-photos-quality}
shift || true
only=" $* "
source "$(dirname "$0")/photos_grid.sh"  # q NAME SIZE ARGS...
# the core first (ratio x mode x prop_attn, and the recommended ratio 0.7 + prop_attn + merge_mlp) at
# every size, then the rest of the issue-11 grid at 32 px
q base32    32 --ratios 0.3,0.5,0.7 --set mode=tokens,kv --set prop_attn=false,true
q mlp32     32 --ratios 0.5,0.7 --merge-mlp true --set prop_attn=false,true
q base64    64 --ratios 0.3,0.5,0.7 --set prop_attn=false,true
q mlp64     64 --ratios 0.7 --merge-mlp true --set prop_attn=false,true
q kvshare64 64 --ratios 0.5 --set mode=tokens,kv --set prop_attn=true --set share_plan=false,true
q base128  128 --ratios 0.5,0.7 --set prop_attn=false,true
q mlp128   128 --ratios 0.7 --merge-mlp true --set prop_attn=true
q share32   32 --ratios 0.5,0.7 --set prop_attn=false,true --set share_plan=true
q every32   32 --ratios 0.5 --set prop_attn=false,true --set plan_every=2,5
q cell4_32  32 --ratios 0.7,0.9 --set sx=4 --set sy=4 --set prop_attn=true
q level2_32 32 --ratios 0.5,0.7 --max-downsample 2 --set prop_attn=false,true
