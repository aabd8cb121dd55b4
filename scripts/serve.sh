#!/usr/bin/env bash
# Serves the small CPU model repository in the foreground on ports 8000 (HTTP), 8001 (gRPC) and
# 8002 (metrics), building it first if needed. Ctrl-C stops the server and its UNet ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cpu_repository.sh
exec scripts/triton_server.sh build/model_repository_cpu "$@"
