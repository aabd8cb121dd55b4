#!/usr/bin/env bash
# Installs a working perf_analyzer (Triton's load generator) for CPU machines without Triton's SDK
# image (the production image has its own). Idempotent: a stamp of the pins below skips work done.
#   - .cache/perf-venv: tritonclient 2.50.0 (the last wheel whose bin/perf_analyzer runs on glibc
#     2.36; 2.60's needs 2.38) and the CUDA runtime library it links (no GPU needed), both with
#     --no-deps: tritonclient 2.50 pins numpy<2 and protobuf<5, so it stays out of .venv.
#   - the Debian package libb64-0d (apt-get update only when the package is unknown).
# scripts/perf_analyzer.sh runs the binary with the right LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

TRITONCLIENT_VERSION=2.50.0
CUDA_RUNTIME_VERSION=12.9.79
venv=.cache/perf-venv
stamp_value="tritonclient==$TRITONCLIENT_VERSION nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
stamp_file=$venv/.setup-stamp

if ! dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q "install ok installed"; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "[perf_analyzer] need root (or sudo) to apt-get install libb64-0d" >&2; exit 1; }
    sudo=sudo
  fi
  if ! apt-cache show libb64-0d >/dev/null 2>&1; then
    echo "[perf_analyzer] apt-get update (libb64-0d unknown to apt)" >&2
    $sudo apt-get update -qq
  fi
  echo "[perf_analyzer] apt-get install libb64-0d" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libb64-0d >/dev/null
fi

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_value" ]; then
  exit 0
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
echo "[perf_analyzer] installing $stamp_value into $venv" >&2
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"
echo "$stamp_value" >"$stamp_file"
# Proves the binary finds every library it needs.
scripts/perf_analyzer.sh --version >/dev/null || {
  echo "[perf_analyzer] installed, but the binary does not start: run scripts/perf_analyzer.sh --version" >&2
  rm -f "$stamp_file"
  exit 1
}
echo "[perf_analyzer] ready: scripts/perf_analyzer.sh" >&2
