#!/usr/bin/env bash
# Issue 19: quality of local matching (match_window = 3, 5) against global matching (none) on the photos
# reference model at its largest canvases, 64 px (4,096 tokens at the finest level) and 128 px (16,384),
# for the settings of the high-resolution speed grid (benchmarks/bench_highres.py). One results.json per
# sub-grid and size under ${1:-highres-quality}/<sub-grid>/<size>px/. Samples per size (those of
# benchmarks/photos_quality.sh): benchmarks/photos_grid.sh. Sub-grids named after the output directory
# run alone ($2 ...).
set -euo pipefail
out=${1:-highres-quality}
shift || true
only=" $* "
source "$(dirname "$0")/photos_grid.sh"  # q NAME SIZE ARGS...
w=(--set match_window=none,3,5)
for size in 128 64; do
  q "default$size" "$size" --ratios 0.5 "${w[@]}"
  q "prop$size"    "$size" --ratios 0.7 --set prop_attn=true "${w[@]}"
  q "mlp$size"     "$size" --ratios 0.7 --merge-mlp true --set prop_attn=true "${w[@]}"
  q "kv$size"      "$size" --ratios 0.75 --set mode=kv --set prop_attn=true "${w[@]}"
  q "cell4_$size"  "$size" --ratios 0.8,0.9 --set sx=4 --set sy=4 --set prop_attn=true "${w[@]}"
done
# does a larger window recover what k = 3 / 5 lose with prop_attn at high ratios?
q prop128wide 128 --ratios 0.7 --set prop_attn=true --set match_window=9,17
q kv128wide   128 --ratios 0.75 --set mode=kv --set prop_attn=true --set match_window=9,17
q cell4_128wide 128 --ratios 0.8,0.9 --set sx=4 --set sy=4 --set prop_attn=true --set match_window=9,17
