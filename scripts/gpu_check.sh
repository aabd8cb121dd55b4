#!/usr/bin/env bash
# The GPU checks in one prepared run (about 8 minutes on an H200): the card, the GPU test tier
# (tests/gpu, marker gpu) and the single-GPU benchmark (benchmarks/gpu_sdxl_unet.py). Results go
# to $OUT (the device tool's folder), else build/gpu_check/:
#   card.txt, gpu_tests.xml, gpu_tests.log, gpu_sdxl_unet.json, gpu_sdxl_unet.log
# On the lent machine (its image has CUDA and torch, not diffusers): run scripts/gpu_wheels.sh
# here first, then the device tool's run with carry [".whl"] and the command
#   bash scripts/gpu_check.sh
# Elsewhere, from this project's venv: scripts/gpu_check.sh (no .whl needed).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  "$python" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version(), 'diffusers', diffusers.__version__,
'gpus', torch.cuda.device_count())"
} >"$out/card.txt" 2>&1
cat "$out/card.txt"

status=0
timeout 240 "$python" -m pytest -p no:cacheprovider -q -rs -m gpu tests/gpu --junitxml="$out/gpu_tests.xml" \
  2>&1 | tee "$out/gpu_tests.log" || status=1
timeout 330 "$python" benchmarks/gpu_sdxl_unet.py --budget-s 240 --output "$out/gpu_sdxl_unet.json" \
  2>&1 | tee "$out/gpu_sdxl_unet.log" || status=1
exit $status
