#!/usr/bin/env bash
# The compiled engine on one lent GPU (issue 14; prepared, about 12 minutes, never run yet): kernel
# counts of a band step compiled by inductor (benchmarks/gpu_band_kernels.py) and the single-GPU
# benchmark with the compiled configurations (plain UNet compiled as one CUDA graph, simulated
# bands of 2/4/8 compiled with the engine's CUDA graphs). Set up as scripts/gpu_check.sh (same
# wheels, same $OUT); results: gpu_band_kernels_compiled.log, gpu_sdxl_unet_compiled.{json,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
export TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache"

status=0
timeout 240 "$python" benchmarks/gpu_band_kernels.py --compile inductor \
  2>&1 | tee "$out/gpu_band_kernels_compiled.log" || status=1
timeout 480 "$python" benchmarks/gpu_sdxl_unet.py --compile inductor --budget-s 420 \
  --output "$out/gpu_sdxl_unet_compiled.json" 2>&1 | tee "$out/gpu_sdxl_unet_compiled.log" || status=1
exit $status
