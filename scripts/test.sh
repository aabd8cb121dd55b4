#!/usr/bin/env bash
# The test command: set-up (if needed), lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# kubectl (kustomize), hadolint, kubernetes-validate, checkov for tests/test_deploy.py
scripts/setup_deploy_tools.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
