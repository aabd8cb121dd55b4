#!/usr/bin/env bash
# The compiled engine on one lent GPU (issue 14; prepared, about 12 minutes, never run yet): kernel
# counts of a band step compiled by inductor (benchmarks/gpu_band_kernels.py) and the single-GPU
# benchmark with the compiled configurations (plain UNet compiled as one CUDA graph, simulated
# bands of 2/4/8 compiled with the engine's CUDA graphs). Set up as scripts/gpu_check.sh (same
# wheels, same $OUT); results: gpu_band_kernels_compiled.log, gpu_sdxl_unet_compiled.{json,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/backend:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR="$out/inductor-cache"

status=0
timeout 240 "$python" benchmarks/gpu_band_kernels.py --compile inductor \
  2>&1 | tee "$out/gpu_band_kernels_compiled.log" || status=1
timeout 480 "$python" benchmarks/gpu_sdxl_unet.py --compile inductor --budget-s 420 \
  --output "$out/gpu_sdxl_unet_compiled.json" 2>&1 | tee "$out/gpu_sdxl_unet_compiled.log" || status=1
exit $status
