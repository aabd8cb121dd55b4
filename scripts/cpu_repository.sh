#!/usr/bin/env bash
# Builds the CPU model repository (build/model_repository_cpu, 2 gloo UNet ranks) of the demo model
# the checkout ships (demo_model/sdxl-shapes, trained here: python -m demo_model.train), if missing
# or out of date. MODEL_DIR=path builds it from another diffusers SDXL directory instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

model_dir=$(realpath "${MODEL_DIR:-demo_model/sdxl-shapes}")
repository=build/model_repository_cpu
[ -f "$model_dir/model_index.json" ] || { echo "[prepare] $model_dir is not a diffusers model directory" >&2; exit 1; }
# The repository holds copies of the templates and the model: rebuild when they, the model or the
# builder change. Requests up to 4096 x 4096; one that names no size gets the model's native size. The UNet
# warms up at 512 x 512 only, to load in seconds (larger sizes get their deadlines and memory
# estimates scaled from it). Images over 1024 x 1024 decode in tiles of 512 x 512, the path high
# resolutions take on GPUs, which keeps each VAE stub under 2 GiB beside the UNet ranks.
stamp_value=$( (find model_repository build_engines backend/distrifusion/export backend/distrifusion/vae \
  backend/distrifusion/serving/stream.py backend/distrifusion/serving/unet_stage.py \
  -type f \( -name '*.py' -o -name '*.pbtxt' \) -not -path '*/__pycache__/*'; find "$model_dir" -type f) |
  LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
stamp_file=$repository/.build-stamp
if [ ! -f "$repository/sdxl/config.pbtxt" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_value" ]; then
  echo "[prepare] building the CPU model repository in $repository" >&2
  HF_HUB_OFFLINE=1 .venv/bin/python -m build_engines --model "$model_dir" --output "$repository" \
    --target cpu --unet-ranks 2 --max-resolution 4096x4096 --warmup-resolutions 512x512 \
    --vae-tile-above 1024x1024 --vae-tile 512 --force
  echo "$stamp_value" >"$stamp_file"
fi
