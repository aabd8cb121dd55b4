#!/usr/bin/env bash
# Checks that requirements.txt (with its dependencies, constrained by
# deploy/docker/image-constraints.txt) installs as wheels on the server image's Python and glibc,
# before choosing or bumping the NGC base image (Dockerfile). Asks PyPI (network), downloads
# nothing but metadata, installs nothing:
#   deploy/check_image_wheels.sh [PYTHON_VERSION] [GLIBC_MINOR]
# Defaults: 3.12 and 39 (nvcr.io/nvidia/tritonserver:25.10-py3 = Ubuntu 24.04, glibc 2.39).
# 24.10 (Ubuntu 22.04, Python 3.10, glibc 2.35): `deploy/check_image_wheels.sh 3.10 35`.
# If not, prints the pins without a wheel, one per line, and exits with status 1.
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=${1:-3.12}
glibc_minor=${2:-39}
pip=${PIP:-.venv/bin/pip}

platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for ((minor = 5; minor <= glibc_minor; minor++)); do
  platforms+=(--platform "manylinux_2_${minor}_x86_64")
done

check() {
  # Only PyPI, ignoring this machine's local wheel folders and constraints.
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' PIP_CONSTRAINT='' "$pip" install --dry-run --quiet \
    --ignore-installed --no-deps --only-binary=:all: --implementation cp \
    --python-version "$python_version" "${platforms[@]}" \
    --target "$(mktemp -d)" "$@" >/dev/null 2>&1
}

# The whole set the Dockerfile installs: the pins and what they pull (torch's CUDA wheels), with
# deploy/docker/image-constraints.txt.
if check -r requirements.txt -c deploy/docker/image-constraints.txt; then
  echo "requirements.txt + deploy/docker/image-constraints.txt, dependencies included, install as" \
    "wheels on CPython $python_version, glibc 2.$glibc_minor" >&2
  exit 0
fi
missing=0
while read -r requirement; do
  if ! check "$requirement"; then
    echo "$requirement"
    missing=$((missing + 1))
  fi
done < <(grep -Ev '^\s*(#|$)' requirements.txt)
echo "$missing pins of requirements.txt have no wheel for CPython $python_version, glibc 2.$glibc_minor" >&2
exit 1
