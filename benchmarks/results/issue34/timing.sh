#!/usr/bin/env bash
# Issue 34: whole SD 1.5 steps on a quiet 2-core CPU, nothing else running (other jobs stopped), OMP_NUM_THREADS=2.
# 1024 px, batch 1 (one CFG call: 2 latent rows), two interleaved rounds after one untimed call per setting.
# (A batch-2 call took 355 s unpatched here, so batch 2, 1536 px and whole 2048 px steps did not fit the session.)
set -euo pipefail
out=${1:-benchmarks/results/issue34}
mkdir -p "$out"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python benchmarks/bench_steps.py --resolutions 1024 --batch 1 --rounds 2 \
  --only "tomesd 0.1.3,default,default k=3,preset" --out "$out/steps_1024.json" > "$out/steps_1024.md" 2> "$out/steps_1024.log"
