#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and this project installed (editable).
# Idempotent: a stamp of the requirement files skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp_value=$(cat requirements.txt requirements-data.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp_file=.venv/.setup-stamp

# perf_analyzer (Triton's load generator) in its own venv; it keeps its own stamp.
scripts/setup_perf_analyzer.sh

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_value" ]; then
  .venv/bin/python -m distrifusion.serving.operator_key create
  exit 0
fi

echo "[setup] creating .venv with $($PYTHON --version)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "[setup] installing pinned requirements (torch CPU build, diffusers, transformers, ...)"
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
# The operator's key (owner-only, outside the checkout): what the servers' model-control APIs need.
.venv/bin/python -m distrifusion.serving.operator_key create
echo "$stamp_value" > "$stamp_file"
echo "[setup] done"
