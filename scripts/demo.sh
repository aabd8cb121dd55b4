#!/usr/bin/env bash
# The main job: set up, build the CPU model repository of the shipped demo model
# (demo_model/sdxl-shapes), start tritonserver, generate one 256x256 image (the model's trained
# size) through the `sdxl` ensemble with the gRPC client, print where it is, and stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cpu_repository.sh

mkdir -p build
log=build/demo_server.log
echo "[demo] starting tritonserver (log: $log)"
scripts/triton_server.sh build/model_repository_cpu >"$log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    echo "[demo] stopping tritonserver"
    kill -TERM "$server"
    wait "$server" || true
  fi
}
trap stop_server EXIT

for _ in $(seq 1 300); do
  if curl -sf "localhost:${HTTP_PORT:-8000}/v2/health/ready" >/dev/null; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "[demo] tritonserver exited; see $log" >&2; exit 1; fi
  sleep 1
done
curl -sf "localhost:${HTTP_PORT:-8000}/v2/health/ready" >/dev/null || { echo "[demo] server not ready; see $log" >&2; exit 1; }

echo "[demo] generating through the sdxl ensemble (2 UNet ranks, corrected_async_gn, 20 steps)"
.venv/bin/python clients/sdxl_client.py --protocol grpc --url "localhost:${GRPC_PORT:-8001}" \
  --prompt "a red circle on a blue background" \
  --height 256 --width 256 --steps 20 --seed 42 --output-dir outputs/demo
echo "[demo] image: $(pwd)/outputs/demo/image_0_seed42.png"
