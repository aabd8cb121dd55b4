#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh goes to a lent GPU machine (its image has torch, CUDA,
# transformers, onnx, onnxruntime and pytest, and reaches no registry): the wheels it lacks, for its
# Python 3.12, into .whl/ (git-ignored; about 61 MiB of the 64 MiB a run may carry, this checkout
# included): diffusers (the engine), open_clip_torch (the CLIP vocabulary of the tiny model),
# tritonclient (the repository builder reads Triton's config schema from it), nvidia-pytriton
# (tritonserver with the Python backend, for the served request) and prometheus_client (the
# supervisor's metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(grep -hE '^(diffusers|open_clip_torch|tritonclient|nvidia-pytriton|prometheus_client)==' requirements.txt requirements-data.txt)
rm -rf .whl
# shellcheck disable=SC2086  # one argument per pin
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl $pins
ls .whl
carried=$(( $(du -sb .whl | cut -f1) + $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) ))
echo "carried with this checkout: $((carried >> 20)) MiB of 64"
[ "$carried" -le $((64 << 20)) ] || { echo "over the 64 MiB a run may carry" >&2; exit 1; }
