"""Which GPU model and TensorRT version a model repository's engines belong to, and checks of it.

TensorRT plans load only in a server with the same TensorRT version and GPU architecture. The
Kubernetes deployment keeps one model repository per GPU product and TensorRT version on a shared
volume, at ``<gpu product>/trt-<major.minor.patch>`` (e.g. ``NVIDIA-H100-80GB-HBM3/trt-10.13.3``).
The GPU product is written as GPU feature discovery writes the node label
``nvidia.com/gpu.product``: the NVML device name with spaces replaced by ``-``.

Commands (standard library only: runs in the server, engine-builder and CPU images):

  repository_key.py key
      print this machine's key (first visible GPU, TensorRT of the server's TensorRT backend)
  repository_key.py expect GPU_PRODUCT TENSORRT_VERSION
      exit 1 unless this machine has that GPU product and TensorRT version (engine-build Job)
  repository_key.py check-builder
      exit 1 unless the TensorRT Python module has the server's TensorRT version (image build)
  repository_key.py check REPOSITORY
      exit 1 unless REPOSITORY holds the `sdxl` ensemble and every TensorRT plan in it (its
      model.plan.json sidecar) was built by this TensorRT version on this GPU product; a CPU
      repository (no plans) passes without a GPU (server start-up)
  repository_key.py gpu-count
      print the number of visible NVIDIA GPUs (0 without a driver)
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TENSORRT_BACKEND = Path("/opt/tritonserver/backends/tensorrt/libtriton_tensorrt.so")
SIDECAR_NAME = "model.plan.json"
ENSEMBLE = "sdxl"


class KeyMismatch(RuntimeError):
    """The repository, GPU or TensorRT version does not match; the message says how."""


def gpu_product(device_name: str) -> str:
    """The `nvidia.com/gpu.product` label value of an NVML device name ("NVIDIA H100 80GB HBM3")."""
    name = re.sub(r"\s+", "-", device_name.strip())
    # A label value: at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric.
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63].strip("-_.")
    if not name:
        raise ValueError(f"no usable GPU product name in {device_name!r}")
    return name


def tensorrt_release(version: str) -> str:
    """major.minor.patch of a TensorRT version string ("10.13.3.9" -> "10.13.3")."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version.strip())
    if not match:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return ".".join(match.groups())


def decode_inferlib_version(value: int) -> str:
    """getInferLibVersion(): major*10000+minor*100+patch from TensorRT 10, major*1000+... before."""
    if value >= 100000:
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return f"{value // 1000}.{value // 100 % 10}.{value % 100}"


def repository_key(product: str, tensorrt_version: str) -> str:
    return f"{product}/trt-{tensorrt_release(tensorrt_version)}"


def visible_gpu_names() -> list[str]:
    """NVML names of the visible GPUs (empty without an NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _tensorrt_library() -> str:
    """The libnvinfer that the server's TensorRT backend links (what will deserialize the plans)."""
    explicit = os.environ.get("TENSORRT_LIBRARY")
    if explicit:
        return explicit
    if TENSORRT_BACKEND.is_file() and shutil.which("ldd"):
        out = subprocess.run(["ldd", str(TENSORRT_BACKEND)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split("=>")
            if parts[0].strip().startswith("libnvinfer.so") and len(parts) == 2:
                path = parts[1].split("(")[0].strip()
                if path and path != "not found":
                    return path
    for major in (11, 10, 9, 8):
        name = f"libnvinfer.so.{major}"
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    raise KeyMismatch("no libnvinfer found: this image has no TensorRT (set TENSORRT_LIBRARY to its path)")


def server_tensorrt_version() -> str:
    """major.minor.patch of the TensorRT runtime that the server loads."""
    library = ctypes.CDLL(_tensorrt_library())
    library.getInferLibVersion.restype = ctypes.c_int32
    return decode_inferlib_version(int(library.getInferLibVersion()))


def local_key() -> str:
    names = visible_gpu_names()
    if not names:
        raise KeyMismatch("no NVIDIA GPU is visible (nvidia-smi lists none)")
    if len({gpu_product(n) for n in names}) != 1:
        raise KeyMismatch(f"the visible GPUs are of different models: {names}")
    return repository_key(gpu_product(names[0]), server_tensorrt_version())


def expect(product: str, tensorrt_version: str) -> str:
    wanted = repository_key(product, tensorrt_version)
    actual = local_key()
    if actual != wanted:
        raise KeyMismatch(
            f"this pod was asked to build engines for {wanted} but runs on {actual}: the node selector "
            f"(nvidia.com/gpu.product) or the engine-builder image does not match SDXL_GPU_PRODUCT / "
            f"SDXL_TENSORRT_VERSION"
        )
    return actual


def tensorrt_python_version() -> str:
    """Version of the installed TensorRT Python bindings, read from package metadata: no import,
    so it works at image build time without a GPU driver."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt-bindings", "tensorrt"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    raise KeyMismatch("the TensorRT Python bindings are not installed")


def check_builder() -> str:
    python_version = tensorrt_python_version()
    server_version = server_tensorrt_version()
    if tensorrt_release(python_version) != server_version:
        raise KeyMismatch(
            f"the TensorRT Python bindings are {python_version} but the server's TensorRT backend "
            f"loads {server_version}: build the engine-builder image with "
            f"--build-arg TENSORRT_VERSION=<the base image's TensorRT version>"
        )
    return server_version


def check_repository(repository: Path) -> str:
    if not (repository / ENSEMBLE / "config.pbtxt").is_file():
        raise KeyMismatch(
            f"{repository} holds no `{ENSEMBLE}` ensemble: build the repository first (the engine-build "
            f"Job writes <volume>/<gpu product>/trt-<version>; is the key in the overlay right?)"
        )
    sidecars = sorted(repository.glob(f"*/*/{SIDECAR_NAME}"))
    if not sidecars:
        return "no TensorRT plans (CPU repository)"
    names = visible_gpu_names()
    if not names:
        raise KeyMismatch(f"{repository} has TensorRT plans but no NVIDIA GPU is visible")
    here = repository_key(gpu_product(names[0]), server_tensorrt_version())
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        built = repository_key(gpu_product(str(meta.get("gpu", ""))), str(meta.get("tensorrt_version", "")))
        if built != here:
            raise KeyMismatch(
                f"{sidecar.parent.parent.name}: its plan was built for {built}, this server is {here}; "
                f"rebuild the engines for this GPU and TensorRT version (engine-build Job)"
            )
    return f"{len(sidecars)} TensorRT plans built for {here}"


def main(argv: list[str]) -> int:
    usage = __doc__.split("Commands", 1)[1]
    try:
        if argv[:1] == ["key"] and len(argv) == 1:
            print(local_key())
        elif argv[:1] == ["expect"] and len(argv) == 3:
            print(f"engine key ok: {expect(argv[1], argv[2])}")
        elif argv[:1] == ["check-builder"] and len(argv) == 1:
            print(f"TensorRT {check_builder()}: Python module and server backend agree")
        elif argv[:1] == ["check"] and len(argv) == 2:
            print(f"model repository ok: {check_repository(Path(argv[1]))}")
        elif argv[:1] == ["gpu-count"] and len(argv) == 1:
            print(len(visible_gpu_names()))
        else:
            print(f"usage: repository_key.py COMMAND{usage}", file=sys.stderr)
            return 2
    except (KeyMismatch, ValueError) as err:
        print(f"repository_key: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
