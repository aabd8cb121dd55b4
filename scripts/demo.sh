#!/usr/bin/env bash
# The main job: set-up (if needed), build the small random-weight SDXL model, and generate one
# 512x512 image with the UNet split over 2 local gloo ranks on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

model_dir=.cache/tiny-sdxl
if [ ! -f "$model_dir/model_index.json" ]; then
  echo "[demo] building the small random-weight SDXL model in $model_dir"
  .venv/bin/distrifusion-tiny-model "$model_dir" --arch sdxl --seed 0 >/dev/null
fi

echo "[demo] generating with 2 ranks (corrected_async_gn, 12 steps)"
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/distrifusion-generate \
  --model "$model_dir" --ranks 2 \
  --prompt "a lighthouse on a cliff at dawn, watercolor" --negative-prompt "blurry" \
  --height 512 --width 512 --steps 12 --seed 42 \
  --output-dir outputs/demo 2>/dev/null
echo "[demo] image: $(pwd)/outputs/demo/image_0.png"
