#!/usr/bin/env bash
# Issue 34 (and 31's ComfyUI row): whole SD 1.5 steps on a quiet 2-core CPU, nothing else running.
# 1024 px: batch 2 (4 latent rows per CFG call), two interleaved rounds after one untimed call per setting;
# 2048 px: batch 1, one call per setting (an unpatched step takes minutes); ComfyUI's sampler at 1024 px.
set -euo pipefail
out=${1:-benchmarks/results/issue34}
mkdir -p "$out"
python benchmarks/bench_steps.py --resolutions 1024 --batch 2 --rounds 2 \
  --only "tomesd 0.1.3,default,default k=3,default /2,preset,preset k=9,preset /2" --out "$out/steps_1024.json" \
  2> "$out/steps_1024.log"
python benchmarks/bench_steps.py --resolutions 2048 --batch 1 --rounds 1 --no-warmup \
  --only "default,default k=3,preset,preset /2" --out "$out/steps_2048.json" 2> "$out/steps_2048.log"
python benchmarks/bench_comfyui.py --px 1024 --rounds 2 --json "$out/comfyui_1024.json" 2> "$out/comfyui_1024.log"
