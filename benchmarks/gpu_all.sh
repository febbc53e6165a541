#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: JIT-build the kernels, run the GPU tests and the
# kernel benchmark. Logs and kernels.json go to $OUT (default ./gpu-out); a short table is printed last.
#   bash benchmarks/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export TOMESD_CACHE_DIR="${TOMESD_CACHE_DIR:-${TMPDIR:-/tmp}/tomesd-build}"  # outside $OUT: keep $OUT to logs
export TOMESD_BUILD_VERBOSE=1

echo "== build (JIT) and info" | tee "$OUT/summary.txt"
python -m tomesd.info >"$OUT/info.log" 2>&1
build_rc=$?
grep -E "^(device|extension|kernel self-check|backend for|refused)" "$OUT/info.log" | tee -a "$OUT/summary.txt"

echo "== GPU tests" | tee -a "$OUT/summary.txt"
python -m pytest -q -m gpu tests/test_cuda_ops.py tests/test_cuda_local.py tests/test_cuda_models.py tests/test_cuda_selfcheck.py -rs >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

echo "== kernel benchmark (fp16, batch 2, ratio 0.5)" | tee -a "$OUT/summary.txt"
python benchmarks/bench_kernels.py --out "$OUT" >"$OUT/bench.log" 2>&1
bench_rc=$?
cat "$OUT/bench.log" | tee -a "$OUT/summary.txt" >/dev/null

echo "== prop_attn cost in SDPA (issue 11; needs diffusers)" | tee -a "$OUT/summary.txt"
if python -c "import diffusers" 2>/dev/null; then
  python benchmarks/bench_prop_attn.py --device cuda --resolutions 512,1024,2048 --ratios 0.5,0.7 \
    --out "$OUT/prop_attn.json" >"$OUT/prop_attn.log" 2>&1 || echo "bench_prop_attn failed (see prop_attn.log)"
  grep -o "^[0-9]* px ratio [0-9.]*:.*bias costs.*" "$OUT/prop_attn.log" | sed 's/:.*bias costs/: bias costs/' | tee -a "$OUT/summary.txt"
else
  echo "skipped: diffusers is not installed (carry its wheel)" | tee -a "$OUT/summary.txt"
fi

echo
echo "info rc=$build_rc  gpu tests rc=$tests_rc  benchmark rc=$bench_rc  (logs in $OUT)"
cat "$OUT/bench.log"
exit $(( build_rc || tests_rc || bench_rc ))
