#!/usr/bin/env bash
# Builds what the CPU server needs, if missing: the small random-weight SDXL model
# (.cache/tiny-sdxl) and its CPU model repository (build/model_repository_cpu, 2 gloo UNet ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

model_dir=.cache/tiny-sdxl
repository=build/model_repository_cpu
if [ ! -f "$model_dir/model_index.json" ]; then
  echo "[prepare] building the small random-weight SDXL model in $model_dir" >&2
  .venv/bin/distrifusion-tiny-model "$model_dir" --arch sdxl --seed 0 >/dev/null
fi
# The repository holds copies of the templates: rebuild when they or the builder change.
# Requests up to 4096 x 4096; one that names no size gets the model's native 1024 x 1024. The UNet
# warms up at 512 x 512 only, to load in seconds (larger sizes get their deadlines and memory
# estimates scaled from it). Images over 1024 x 1024 decode in tiles of 512 x 512, the path high
# resolutions take on GPUs, which keeps each VAE stub under 2 GiB beside the UNet ranks.
stamp_value=$(find model_repository build_engines backend/distrifusion/export backend/distrifusion/vae \
  -type f \( -name '*.py' -o -name '*.pbtxt' \) \
  -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
stamp_file=$repository/.build-stamp
if [ ! -f "$repository/sdxl/config.pbtxt" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_value" ]; then
  echo "[prepare] building the CPU model repository in $repository" >&2
  HF_HUB_OFFLINE=1 .venv/bin/python -m build_engines --model "$model_dir" --output "$repository" \
    --target cpu --unet-ranks 2 --max-resolution 4096x4096 --warmup-resolutions 512x512 \
    --vae-tile-above 1024x1024 --vae-tile 512 --force
  echo "$stamp_value" >"$stamp_file"
fi
