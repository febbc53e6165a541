#!/usr/bin/env bash
# Issue 28: quality of today's options on the photos-sdxl and photos-flux reference models (tomesd.quality), one
# run per model and size (every setting a --variant, so the unpatched images are made once per size), results in
# ${1:-issue28-quality}/<model>_<size>/<size>px/results.json. Ranked against the photos model by
# benchmarks/results/issue28/ranks.py. Runs named as their output directory (sdxl_64, flux_128, ...) run alone ($2 ...).
# Images: 8 photographs × seed 0 in one pipeline call, no warm-up call; one thread (taskset: the tool uses the
# cores it may run on), as the runs shared a loaded 2-core CPU, so their times are not quoted. Steps: 20 at the
# training size, fewer on the larger canvases (a guided 256 px photos-sdxl step of one image, 16,384 tokens at /2,
# takes about 20 s on a free core). The pipelines' default guidance, apply_patch seed 0. photos-flux: the mode given
# in every variant (kv rows join the photos model's kv rows).
set -euo pipefail
out=${1:-issue28-quality}
shift || true
only=" $* "
photos=(--prompt astronaut --prompt chelsea --prompt coffee --prompt rocket --prompt hubble_deep_field --prompt grass
        --prompt gravel --prompt flower)
q() {
  name=$1; model=$2; size=$3; steps=$4; shift 4
  if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
  taskset -c "${CPU:-1}" python -m tomesd.quality --model "$model" --sizes "$size" --steps "$steps" "${photos[@]}" \
    --batch 8 --warmup 0 --no-progress --out "$out/$name" "$@"
}
v() { for setting in "$@"; do printf -- '--variant\n%s\n' "$setting"; done; }
# photos-sdxl: ratio × prop_attn, both attention levels (max_downsample 4; 2 = the default's /2 alone), local
# matching, 4×4 cells
mapfile -t sdxl < <(v ratio=0.3,prop_attn=false ratio=0.5,prop_attn=false ratio=0.7,prop_attn=false \
  ratio=0.3,prop_attn=true ratio=0.5,prop_attn=true ratio=0.7,prop_attn=true \
  ratio=0.5,max_downsample=4 ratio=0.7,max_downsample=4 ratio=0.5,match_window=3 ratio=0.5,match_window=5 \
  ratio=0.7,prop_attn=true,match_window=3 ratio=0.7,prop_attn=true,match_window=5 \
  ratio=0.9,sx=4,sy=4,prop_attn=false ratio=0.9,sx=4,sy=4,prop_attn=true)
q sdxl_64 photos-sdxl 64 20 "${sdxl[@]}" --variant ratio=0.5,max_downsample=2
q sdxl_128 photos-sdxl 128 6 "${sdxl[@]}"
mapfile -t sdxl256 < <(v ratio=0.5,prop_attn=false ratio=0.7,prop_attn=true ratio=0.5,max_downsample=4 \
  ratio=0.7,prop_attn=true,match_window=3 ratio=0.9,sx=4,sy=4,prop_attn=true)
q sdxl_256 photos-sdxl 256 3 "${sdxl256[@]}"
# photos-flux: kv mode (its default): ratio × prop_attn, local matching (at 0.5 and at the photos model's 0.75),
# merge_mlp; tokens mode (issue 29: merged tokens at their anchors' rotary positions): ratio, prop_attn, local
# matching, merge_mlp
kv() { for setting in "$@"; do printf -- '--variant\nmode=kv,%s\n' "$setting"; done; }
tokens() { for setting in "$@"; do printf -- '--variant\nmode=tokens,%s\n' "$setting"; done; }
mapfile -t flux < <(kv ratio=0.3,prop_attn=false ratio=0.5,prop_attn=false ratio=0.7,prop_attn=false \
  ratio=0.3,prop_attn=true ratio=0.5,prop_attn=true ratio=0.7,prop_attn=true \
  ratio=0.5,prop_attn=true,match_window=3 ratio=0.5,prop_attn=true,match_window=5 \
  ratio=0.75,prop_attn=true ratio=0.75,prop_attn=true,match_window=3 ratio=0.75,prop_attn=true,match_window=5 \
  ratio=0.5,prop_attn=true,merge_mlp=true ratio=0.7,prop_attn=true,merge_mlp=true;
  tokens ratio=0.3 ratio=0.5 ratio=0.7 ratio=0.5,prop_attn=true ratio=0.5,match_window=3 ratio=0.5,merge_mlp=true)
q flux_32 photos-flux 32 20 "${flux[@]}"
q flux_64 photos-flux 64 10 "${flux[@]}"
mapfile -t flux128 < <(kv ratio=0.3,prop_attn=true ratio=0.5,prop_attn=false ratio=0.5,prop_attn=true ratio=0.7,prop_attn=true \
  ratio=0.75,prop_attn=true ratio=0.75,prop_attn=true,match_window=3 ratio=0.75,prop_attn=true,match_window=5 \
  ratio=0.5,prop_attn=true,merge_mlp=true; tokens ratio=0.5 ratio=0.5,prop_attn=true ratio=0.5,match_window=3)
q flux_128 photos-flux 128 6 "${flux128[@]}"
