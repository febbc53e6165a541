#!/usr/bin/env bash
# Issue 28: quality of today's options on the photos-sdxl and photos-flux reference models (tomesd.quality),
# one results.json per sub-grid and size under ${1:-issue28-quality}/<sub-grid>/<size>px/. Ranked against the
# photos model by benchmarks/results/issue28/ranks.py. Sub-grids named after the output directory run alone ($2 ...).
# Images: 8 photographs × seed 0, all in one pipeline call, no warm-up call (the timings are not quoted: the
# runs shared a loaded 2-core CPU). Steps: 20 at the training size, 10 at twice it, 4 (photos-sdxl, 256 px: one
# unpatched guided step of 8 images takes about 8 minutes on one core) or 10 (photos-flux, 128 px) at four times it;
# at the largest canvas fewer sub-grids (every sub-grid makes its own unpatched images).
# The pipelines' default guidance; apply_patch seed 0. photos-flux: mode=kv (its default) given explicitly, so
# the settings join the photos model's kv rows.
set -euo pipefail
out=${1:-issue28-quality}
shift || true
only=" $* "
photos=(--prompt astronaut --prompt chelsea --prompt coffee --prompt rocket --prompt hubble_deep_field --prompt grass
        --prompt gravel --prompt flower)
q() {
  name=$1; model=$2; size=$3; steps=$4; shift 4
  if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
  python -m tomesd.quality --model "$model" --sizes "$size" --steps "$steps" "${photos[@]}" --batch 8 --warmup 0 \
    --no-progress --out "$out/$name" "$@"
}
w=(--set match_window=3,5)
# photos-sdxl: the core at every size (ratio × prop_attn, both attention levels, local matching, 4×4 cells)
for size in 64 128; do
  steps=$((size == 64 ? 20 : 10))
  q "sdxl_base$size"  photos-sdxl "$size" "$steps" --ratios 0.3,0.5,0.7 --set prop_attn=false,true
  q "sdxl_level$size" photos-sdxl "$size" "$steps" --ratios 0.5,0.7 --max-downsample 4
  q "sdxl_win$size"   photos-sdxl "$size" "$steps" --ratios 0.5 "${w[@]}"
  q "sdxl_winp$size"  photos-sdxl "$size" "$steps" --ratios 0.7 --set prop_attn=true "${w[@]}"
  q "sdxl_cell4_$size" photos-sdxl "$size" "$steps" --ratios 0.9 --set sx=4 --set sy=4 --set prop_attn=false,true
done
q sdxl_level2_64 photos-sdxl 64 20 --ratios 0.5,0.7 --max-downsample 2  # the default's levels: identical to sdxl_base64
# 256 px (16,384 tokens at /2): fewer sub-grids, each pays for its own unpatched images
q sdxl_256 photos-sdxl 256 4 --ratios 0.5,0.7 --set prop_attn=false,true
q sdxl_256cell4 photos-sdxl 256 4 --ratios 0.9 --set sx=4 --set sy=4 --set prop_attn=true --set match_window=none,3
# photos-flux: kv mode, ratio × prop_attn, local matching (at 0.5 and at the photos model's 0.75), merge_mlp
for size in 32 64; do
  steps=$((size == 32 ? 20 : 10))
  q "flux_base$size" photos-flux "$size" "$steps" --ratios 0.3,0.5,0.7 --set mode=kv --set prop_attn=false,true
  q "flux_win$size"  photos-flux "$size" "$steps" --ratios 0.5,0.75 --set mode=kv --set prop_attn=true --set match_window=none,3,5
  q "flux_mlp$size"  photos-flux "$size" "$steps" --ratios 0.5,0.7 --set mode=kv --set prop_attn=true --merge-mlp true
done
q flux_base128 photos-flux 128 10 --ratios 0.3,0.5,0.7 --set mode=kv --set prop_attn=false,true
q flux_win128 photos-flux 128 10 --ratios 0.75 --set mode=kv --set prop_attn=true --set match_window=none,3,5
