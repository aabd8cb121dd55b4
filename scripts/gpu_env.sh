# Sourced by scripts/gpu_check.sh and scripts/gpu_compile_check.sh: the results folder ($out), the
# Python ($python) and, on a lent machine, the wheels carried in .whl/ and this checkout on the path.
out=${OUT:-build/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# The project from this checkout, uninstalled: the engine package and the top-level packages.
export PYTHONPATH="$PWD/backend:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
