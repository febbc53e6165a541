#!/usr/bin/env bash
# Issue 34: the quality of every setting README recommends for high resolution (and the candidates
# beside them), on the photos reference model with ALL twelve photographs (seed 0) at 64 px (4,096
# tokens at the finest level; 20 DDIM steps) and 128 px (16,384 tokens, as SD 1.5 at 1024 px; 10 steps),
# so each setting has a worst image, not just a mean. One tomesd.quality run per size (the unpatched
# images made once), every setting a --variant. Results: ${1:-presets-quality}/<size>px/results.json
# (per-image PSNR under "tile_psnr"). Timings of this run are not used (it may share the machine).
set -euo pipefail
out=${1:-presets-quality}
sizes=${2:-64,128}
v=(
  --variant ratio=0.5                                        # the default (tomesd 0.1.3's settings)
  --variant ratio=0.5,match_window=3
  --variant ratio=0.5,match_window=5
  --variant ratio=0.5,max_downsample=2                       # the second level too
  --variant ratio=0.7,prop_attn=true
  --variant ratio=0.7,prop_attn=true,match_window=5
  --variant ratio=0.7,prop_attn=true,match_window=9
  --variant ratio=0.8,sx=4,sy=4,prop_attn=true
  --variant ratio=0.9,sx=4,sy=4,prop_attn=true               # the high-resolution preset at 1024 px and up
  --variant ratio=0.9,sx=4,sy=4,prop_attn=true,match_window=9
  --variant ratio=0.9,sx=4,sy=4,prop_attn=true,match_window=17
  --variant ratio=0.9,sx=4,sy=4,prop_attn=true,max_downsample=2
)
for size in ${sizes//,/ }; do
  case $size in
    64) steps=20 ;;
    128) steps=10 ;;
    *) steps=20 ;;
  esac
  python -m tomesd.quality --model photos --sizes "$size" --steps "$steps" --batch 6 --warmup 0 --no-progress \
    --out "$out" "${v[@]}"
done
