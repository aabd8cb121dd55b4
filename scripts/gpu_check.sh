#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine (or any machine with CUDA):
#   scripts/gpu_check.sh [quick|full]
# quick (the default; at most 6 minutes): what the machine has (its prerequisites, named when
#   missing), the GPU test tier (tests/gpu: the engine and CUDA graphs on one GPU, two UNet ranks on
#   one GPU in a gloo group, NCCL across GPUs where there are two), and one request served by
#   tritonserver (where the nvidia-pytriton wheel is) from a repository of the tiny model built here:
#   TensorRT engines where TensorRT is installed, else ONNX Runtime ones with the UNet on the GPU.
# full: quick, then the single-GPU benchmark (benchmarks/gpu_sdxl_unet.py, about 5 minutes more).
# Results go to $OUT (the device tool's folder), else build/gpu_check/: gpu_check.log (every stage),
# gpu_tests.xml, served.png, gpu_sdxl_unet.json (full).
# On a lent machine: run scripts/gpu_wheels.sh here first, then the device tool's run with carry
# [".whl"] and the command `bash scripts/gpu_check.sh quick`.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
case $mode in quick | full) ;; *) echo "usage: scripts/gpu_check.sh [quick|full]" >&2; exit 2 ;; esac
source scripts/gpu_env.sh
log=$out/gpu_check.log
: >"$log"
status=0

stage() {  # stage NAME SECONDS COMMAND...: runs it under a timeout, its output in the log
  local name=$1 seconds=$2 started=$SECONDS
  shift 2
  echo "== $name (at most ${seconds} s)" | tee -a "$log"
  timeout "$seconds" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - started)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; } | tee -a "$log"
stage prerequisites 60 "$python" scripts/gpu_prerequisites.py || exit 1
stage gpu_tests 200 "$python" -m pytest -p no:cacheprovider -q -rs -m gpu tests/gpu --junitxml="$out/gpu_tests.xml"
work=build/gpu_check_work
stage tiny_model 60 "$python" -m distrifusion.cli.tiny_model "$work/model" --arch sdxl --seed 0
if grep -q "served request (.*) runs" "$log"; then
  stage served_request 240 "$python" scripts/gpu_served_request.py "$work/model" "$work" "$out/served.png"
else
  echo "== served_request: skipped (see prerequisites)" | tee -a "$log"
fi
if [ "$mode" = full ]; then
  stage gpu_sdxl_unet 330 "$python" benchmarks/gpu_sdxl_unet.py --budget-s 240 --output "$out/gpu_sdxl_unet.json"
fi
exit $status
