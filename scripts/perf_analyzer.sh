#!/usr/bin/env bash
# Runs perf_analyzer with the libraries it needs, installing it first if missing
# (scripts/setup_perf_analyzer.sh). PERF_ANALYZER=/path/to/perf_analyzer uses another binary
# instead (e.g. the one in Triton's SDK image). Every argument goes to perf_analyzer:
#   scripts/perf_analyzer.sh -m sdxl -i grpc -u localhost:8001 --input-data clients/perf_inputs.json ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if [ -n "${PERF_ANALYZER:-}" ]; then
  exec "$PERF_ANALYZER" "$@"
fi
venv=$root/.cache/perf-venv
if [ ! -f "$venv/.setup-stamp" ]; then
  "$root/scripts/setup_perf_analyzer.sh"
fi
site=$(echo "$venv"/lib/python3*/site-packages)
binary=$venv/bin/perf_analyzer
export LD_LIBRARY_PATH="$site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}"
exec "$binary" "$@"
