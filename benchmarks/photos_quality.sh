#!/usr/bin/env bash
# Issue 18: quality of the issue-11 mode / plan settings on the photos reference model (tomesd.quality
# --model photos), one results.json per sub-grid and size under ${1:-photos-quality}/<sub-grid>/<size>px/.
# Ranked against the digits model's issue-11 results by benchmarks/photos_ranks.py.
# 32 px: every photograph once (12 images), 20 DDIM steps; 64 px: 6 photographs, 20 steps; 128 px: 2
# photographs, 10 steps (a 128 px UNet call is ~60x a 32 px one on a CPU); 64 and 128 px without a warm-up
# call. The pipeline's guidance (PhotosPipeline.default_guidance_scale), apply_patch seed 0.
# Sub-grids named after the output directory run alone ($2 ...).
set -euo pipefail
out=${1:-photos-quality}
shift || true
only=" $* "
q() {
  name=$1; size=$2; shift 2
  if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
  case $size in
    32) sample=(--batch 12) ;;
    64) sample=(--prompt astronaut --prompt chelsea --prompt coffee --prompt hubble_deep_field --prompt grass --prompt flower
        --batch 6 --warmup 0) ;;
    128) sample=(--prompt chelsea --prompt gravel --steps 10 --batch 2 --warmup 0) ;;
  esac
  python -m tomesd.quality --model photos --sizes "$size" "${sample[@]}" --no-progress --out "$out/$name" "$@"
}
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
