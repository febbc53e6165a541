#!/usr/bin/env bash
# Issue 11: quality of the mode / plan settings on the reference digits model (tomesd.quality), one
# results.json per sub-grid under ${1:-modes-quality}/ (sub-grids named after it run alone: $2 ...).
# Joined with benchmarks/bench_modes.py's speed by benchmarks/pareto.py. 100 images per setting
# (digits 0-9 x seeds 0-9), 20 DDIM steps, guidance 2, apply_patch seed 0.
set -euo pipefail
out=${1:-modes-quality}
shift || true
only=" $* "
q() {
  name=$1; shift
  if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
  python -m tomesd.quality --model reference --seeds 0-9 --batch 100 --no-progress --out "$out/$name" "$@"
}
# the grid: tokens / kv, with and without prop_attn, share_plan, plan_every 2 and 5
q base    --ratios 0.3,0.5,0.7 --set mode=tokens,kv --set prop_attn=false,true --set share_plan=false,true
q every   --ratios 0.3,0.5,0.7 --set mode=tokens,kv --set prop_attn=false,true --set plan_every=2,5
# where prop_attn's quality margin can be spent: a second level, the MLP, larger cells (sx = sy = 4)
q level2  --ratios 0.3,0.5,0.7 --max-downsample 2 --set mode=tokens,kv --set prop_attn=false,true
q mlp     --ratios 0.5,0.7 --merge-mlp true --set mode=tokens,kv --set prop_attn=false,true --set share_plan=false,true
q cell4   --ratios 0.7,0.8,0.9 --set sx=4 --set sy=4 --set mode=tokens,kv --set prop_attn=true --max-downsample 1,2
q cell4b  --ratios 0.7,0.9 --set sx=4 --set sy=4 --set mode=tokens,kv --set prop_attn=true --merge-mlp true
q level2b --ratios 0.5,0.7 --max-downsample 2 --merge-mlp true --set mode=tokens,kv --set prop_attn=true
