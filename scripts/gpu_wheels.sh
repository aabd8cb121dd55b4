#!/usr/bin/env bash
# Run here, before scripts/gpu_check.sh goes to a lent GPU machine: the wheels its image lacks
# (diffusers; the image has torch, transformers, safetensors, huggingface_hub), into .whl/
# (git-ignored), for its Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
diffusers=$(grep -E '^diffusers==' requirements.txt)
rm -rf .whl
.venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl "$diffusers"
ls .whl
