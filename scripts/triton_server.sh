#!/usr/bin/env bash
# Starts the real tritonserver bundled in the nvidia-pytriton wheel (CPU machines; the production
# image has its own) on a model repository, in the foreground, under the supervisor:
#   scripts/triton_server.sh [MODEL_REPOSITORY] [extra tritonserver flags...]
# Ports: HTTP 8000, gRPC 8001, metrics 8002, the supervisor's metrics 8003 (override with HTTP_PORT,
# GRPC_PORT, METRICS_PORT, SUPERVISOR_METRICS_PORT).
# The model-repository, shared-memory, trace and logging APIs need the operator's key
# (distrifusion.serving.operator_key): created here, owner-only, if there is none yet.
# SERVING_PYTHON: an interpreter whose environment already holds this project, its requirements and the
# nvidia-pytriton wheel (a lent GPU machine, scripts/gpu_env.sh); otherwise .venv, set up first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SERVING_PYTHON:-}" ]; then
  python=$(command -v "$SERVING_PYTHON")
else
  scripts/setup.sh
  python=$(pwd)/.venv/bin/python
fi

repository=${1:-build/model_repository_cpu}
shift || true
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python_libdir=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
python_version=$("$python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")

# The wheel's server tree is read-only data: run a writable copy with this Python's backend stub.
server=.cache/tritonserver
if [ ! -x "$server/bin/tritonserver" ] || [ "$site/pytriton/tritonserver/bin/tritonserver" -nt "$server/bin/tritonserver" ]; then
  rm -rf "$server"
  mkdir -p "$(dirname "$server")"
  cp -r "$site/pytriton/tritonserver" "$server"
  cp "$site/pytriton/tritonserver/python_backend_stubs/$python_version/triton_python_backend_stub" \
    "$server/backends/python/"
fi

# The stub embeds the first python3 on PATH (ours, with torch and this project) and must load the
# libpython of the same build.
export PATH="$(dirname "$python"):$PATH"
export LD_LIBRARY_PATH="$python_libdir:$site/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}"
export HF_HUB_OFFLINE=1
# Under the supervisor (distrifusion.serving.supervisor), as in the production image: it restricts
# the model-control APIs to the operator's key, reloads dead Python-backend stubs and holds
# readiness false while any served model is not ready, which needs the model-control API (explicit mode; the ensemble loads its composing models, and the VAE engines
# that its vae_decoder stage calls through BLS are named here, as are vae_encoder and its engines,
# which the unet stage calls for image-to-image requests).
"$python" -m distrifusion.serving.operator_key create
exec "$python" -m distrifusion.serving.supervisor --metrics-port="${SUPERVISOR_METRICS_PORT:-8003}" \
  -- "$server/bin/tritonserver" \
  --model-repository="$(realpath "$repository")" \
  --model-control-mode=explicit --load-model=sdxl --load-model=sdxl_stream \
  --load-model=vae_decoder_whole --load-model=vae_decoder_tile_statistics --load-model=vae_decoder_tiles \
  --load-model=vae_encoder --load-model=vae_encoder_whole --load-model=vae_encoder_tile_statistics \
  --load-model=vae_encoder_tiles \
  --backend-directory="$(realpath "$server/backends")" \
  --http-port="${HTTP_PORT:-8000}" --grpc-port="${GRPC_PORT:-8001}" --metrics-port="${METRICS_PORT:-8002}" \
  --allow-metrics=true \
  --exit-timeout-secs=60 \
  "$@"
