#!/usr/bin/env bash
# The main job: set up, build the small random-weight SDXL model and its CPU model repository,
# start tritonserver, generate one 512x512 image through the `sdxl` ensemble with the gRPC client,
# print where it is, and stop the server.
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

echo "[demo] generating through the sdxl ensemble (2 UNet ranks, corrected_async_gn, 12 steps)"
.venv/bin/python clients/sdxl_client.py --protocol grpc --url "localhost:${GRPC_PORT:-8001}" \
  --prompt "a lighthouse on a cliff at dawn, watercolor" --negative-prompt "blurry" \
  --height 512 --width 512 --steps 12 --seed 42 --output-dir outputs/demo
echo "[demo] image: $(pwd)/outputs/demo/image_0_seed42.png"
