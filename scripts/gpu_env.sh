# Sourced by scripts/gpu_check.sh and scripts/gpu_compile_check.sh: the results folder ($out) and
# the Python ($python, exported as SERVING_PYTHON for tritonserver's backend stub). On a lent
# machine (no registry) the wheels carried in .whl/ (scripts/gpu_wheels.sh) and this checkout are
# installed into that Python's own environment: the stub imports from it and ignores PYTHONPATH.
out=${OUT:-build/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=$PWD/.venv/bin/python
python=$(command -v "$python")
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
    || echo "gpu_env: the carried wheels did not install" >&2
fi
if ! "$python" -c "import distrifusion, build_engines, clients" 2>/dev/null \
  && ! "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e .; then
  # Enough for everything but tritonserver's stub (the served request then fails at its load).
  echo "gpu_env: this checkout did not install into $python's environment; using PYTHONPATH" >&2
  export PYTHONPATH="$PWD/backend:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export SERVING_PYTHON=$python PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
