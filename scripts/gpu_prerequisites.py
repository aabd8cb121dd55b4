"""What scripts/gpu_check.sh needs, checked on this machine before any GPU time is spent.

Prints one line per prerequisite (found, or missing and what then cannot run) and the stages that
will run; exits 1 when something every stage needs is missing (the GPU test tier needs torch with
CUDA and a GPU, diffusers, transformers, pytest and this checkout importable), 0 otherwise.
Optional parts only drop or change their stage: the nvidia-pytriton wheel's tritonserver with a
backend stub for this Python and a shared libpython, and onnx, onnxruntime and sympy (the served
request and its repository build); TensorRT (that build then makes TensorRT engines of the tiny
model, else ONNX Runtime ones with the UNet on the GPU).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import sysconfig
from pathlib import Path

ESSENTIAL = "every stage"
BUILD = "the repository builds (served request, TensorRT build)"


class Missing(Exception):
    """A prerequisite is not there; the message says what of it."""


def _version(module: str) -> str:
    try:
        loaded = importlib.import_module(module)
    except Exception as error:  # ImportError, or OSError for a missing shared library
        raise Missing(f"{type(error).__name__}: {error}") from None
    return str(getattr(loaded, "__version__", "installed"))


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise Missing(f"torch {torch.__version__} sees no CUDA GPU")
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"NCCL {nccl}, {len(names)} GPU(s): {', '.join(names)}"
    )


def _tritonserver() -> str:
    """The wheel's tritonserver, a backend stub for this Python, and the shared libpython it loads."""
    spec = importlib.util.find_spec("pytriton")  # the package's own imports need its dependencies
    if spec is None or spec.origin is None:
        raise Missing("the nvidia-pytriton wheel is not installed")
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    library = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("LDLIBRARY") or "")
    problems = [
        f"no {what}"
        for what, path in (
            ("tritonserver binary", root / "bin" / "tritonserver"),
            (f"stub for Python {version}", stub),
        )
        if not path.is_file()
    ]
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not library.is_file():
        problems.append(f"no shared libpython for the stub to load (looked for {library})")
    if problems:
        raise Missing("; ".join(problems))
    return (
        f"nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')} ({root / 'bin' / 'tritonserver'})"
    )


def main() -> int:
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    found: dict[str, str | None] = {}
    checks = {
        "torch with CUDA": (ESSENTIAL, _cuda),
        "diffusers": (ESSENTIAL, lambda: _version("diffusers")),
        "transformers": (ESSENTIAL, lambda: _version("transformers")),
        "pytest": (ESSENTIAL, lambda: _version("pytest")),
        "this checkout (distrifusion)": (ESSENTIAL, lambda: _version("distrifusion")),
        "onnx": (BUILD, lambda: _version("onnx")),
        "onnxruntime": (BUILD, lambda: _version("onnxruntime")),
        "sympy": (BUILD, lambda: _version("sympy")),
        "tensorrt": ("TensorRT engines in the served repository", lambda: _version("tensorrt")),
        "tritonserver": ("the served request", _tritonserver),
    }
    for name, (needed_by, check) in checks.items():
        try:
            found[name] = check()
            print(f"  found     {name}: {found[name]}")
        except Missing as missing:
            found[name] = None
            print(f"  MISSING   {name}: needed by {needed_by} ({missing})")
    missing_essential = [
        name for name, (needed_by, _) in checks.items() if needed_by == ESSENTIAL and not found[name]
    ]
    builds = all(found[name] for name in ("onnx", "onnxruntime", "sympy"))
    engines = "TensorRT engines" if found["tensorrt"] else "ONNX Runtime engines, no TensorRT"
    stages = {
        "gpu test tier": not missing_essential,
        f"served request ({engines})": not missing_essential and builds and bool(found["tritonserver"]),
    }
    print(
        "stages: " + ", ".join(f"{stage} {'runs' if runs else 'SKIPPED'}" for stage, runs in stages.items())
    )
    if missing_essential:
        print(f"cannot run the GPU checks: {', '.join(missing_essential)} missing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
