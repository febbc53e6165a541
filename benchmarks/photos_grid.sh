# Sourced by benchmarks/photos_quality.sh and benchmarks/highres_quality.sh: `q NAME SIZE ARGS...` runs
# tomesd.quality on the photos reference model at SIZE px with that size's samples, writing
# $out/NAME/<SIZE>px/results.json, unless sub-grid names were given ($only) and NAME is not one of them.
# 32 px: every photograph once (12 images), 20 DDIM steps; 64 px: 6 photographs, 20 steps; 128 px: 2
# photographs, 10 steps (a 128 px UNet call is ~60x a 32 px one on a CPU); 64 and 128 px without a
# warm-up call. The pipeline's guidance (PhotosPipeline.default_guidance_scale), apply_patch seed 0.
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
