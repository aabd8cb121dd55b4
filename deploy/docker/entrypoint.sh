#!/usr/bin/env bash
# Entry point of the server images (Dockerfile targets `server` and `cpu-smoke`). For
# `tritonserver ...` it
#   1. checks the model repository (--model-repository=...): it must hold the `sdxl` ensemble, and
#      every TensorRT plan must have been built for this GPU product and TensorRT version
#      (deploy/docker/repository_key.py check), so a wrong engine is never loaded;
#   2. sizes Triton's CUDA memory pool (the ensemble's GPU tensors between stages) on every visible
#      GPU: --cuda-memory-pool-byte-size=<gpu>:$CUDA_MEMORY_POOL_BYTE_SIZE (none without a GPU);
# then replaces itself with the supervisor running the command. Any other command runs unchanged.
set -euo pipefail

here=$(dirname "$(readlink -f "$0")")
if [ "${1:-}" != "tritonserver" ]; then
  exec "$@"
fi

repository=""
for arg in "$@"; do
  case "$arg" in
    --model-repository=*) repository=${arg#--model-repository=} ;;
  esac
done
if [ -z "$repository" ]; then
  echo "entrypoint: tritonserver needs --model-repository=PATH" >&2
  exit 2
fi
python3 "$here/repository_key.py" check "$repository" >&2

pool_flags=()
gpus=$(python3 "$here/repository_key.py" gpu-count)
for ((gpu = 0; gpu < gpus; gpu++)); do
  pool_flags+=("--cuda-memory-pool-byte-size=${gpu}:${CUDA_MEMORY_POOL_BYTE_SIZE:-1073741824}")
done
echo "entrypoint: ${gpus} GPU(s); starting $*${pool_flags[*]:+ ${pool_flags[*]}} under the supervisor" >&2
# The supervisor (distrifusion.serving.supervisor) runs tritonserver as its child, reloads dead
# Python-backend stubs and holds readiness false while any part is broken.
exec python3 -m distrifusion.serving.supervisor -- "$@" "${pool_flags[@]}"
