# syntax=docker/dockerfile:1
# DistriFusion SDXL on NVIDIA Triton Inference Server: the serving image, the engine-builder image
# and a CPU smoke-test image, from one file (README "Deploying on Kubernetes").
#
#   docker build --target server         -t REGISTRY/sdxl-triton:TAG .               (the default)
#   docker build --target engine-builder -t REGISTRY/sdxl-triton-engine-builder:TAG .
#   docker build --target cpu-smoke      -t REGISTRY/sdxl-triton-cpu-smoke:TAG .
#
# Base image: nvcr.io/nvidia/tritonserver:25.10-py3 (Triton with the TensorRT and Python
# backends; Ubuntu 24.04, Python 3.12, CUDA 13.0). Why this release:
# - requirements.txt (the same lock the README set-up installs) must install as wheels on the
#   image's Python. All 78 pins have manylinux wheels for CPython 3.12 (checked with
#   deploy/check_image_wheels.sh), with their dependencies. 24.10 (Triton 2.51, the server of the
#   CPU set-up) ships Python 3.10 on Ubuntu 22.04, and 17 pins have no wheel for it
#   (annotated-doc, diffusers, transformers, onnxruntime, pillow, networkx and others need
#   Python >= 3.11).
# - torch 2.13.0 from PyPI is a CUDA 13.0 build, so the image's CUDA major is 13 as well. Then one
#   driver branch serves both torch and Triton's TensorRT backend.
# The UNet stage uses torch's own NCCL and CUDA libraries (from its wheels). The text encoders and
# the VAE are TensorRT plans, run by the image's TensorRT backend.

# --- base: the project and its pinned dependencies on the NGC Triton image ---------------------
FROM nvcr.io/nvidia/tritonserver:25.10-py3 AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="distrifusion-sdxl-triton" \
      org.opencontainers.image.description="SDXL text-to-image on Triton with a DistriFusion patch-parallel UNet"
# The image's Python is the system Python 3.12. --ignore-installed leaves Ubuntu's own python3-*
# packages alone: pip cannot uninstall them, and /usr/local comes first on sys.path anyway.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/distrifusion
# image-constraints.txt pins what torch's CUDA build adds on Linux (CUDA 13.0 wheels, triton) and
# setuptools, which builds this project below: the whole set is pinned.
COPY requirements.txt deploy/docker/image-constraints.txt ./
RUN python3 -m pip install --no-cache-dir --ignore-installed -r requirements.txt -c image-constraints.txt
COPY pyproject.toml ./
COPY backend/ backend/
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python3 -c "import distrifusion, diffusers, transformers, torch; print('torch', torch.__version__)"
# build_engines runs from this folder (python -m build_engines); model_repository/ holds its templates.
COPY build_engines/ build_engines/
COPY model_repository/ model_repository/
COPY deploy/docker/ deploy/docker/
RUN chmod 0755 deploy/docker/entrypoint.sh \
    && groupadd --gid 10001 distrifusion \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin distrifusion
# The root file system is read-only in Kubernetes: every cache goes to /tmp (a scratch volume).
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/.triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_MEMORY_POOL_BYTE_SIZE=1073741824 \
    DISTRIFUSION_OPERATOR_KEY_FILE=/run/secrets/distrifusion/operator-key

# --- engine-builder: + the TensorRT Python API of the same TensorRT version as the server ------
# Runs `python3 -m build_engines --target gpu` in the engine-build Job (deploy/components/
# tensorrt-engines). The build fails here if TENSORRT_VERSION is not the TensorRT release that
# the base image's TensorRT backend loads.
FROM base AS engine-builder
ARG TENSORRT_VERSION=10.13.3.9
RUN python3 -m pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com \
        "tensorrt-cu13==${TENSORRT_VERSION}" \
    && python3 deploy/docker/repository_key.py check-builder
USER 10001:10001
HEALTHCHECK NONE

# --- cpu-smoke: the small random-weight model on the CPU (Kubernetes smoke tests, no GPU) -------
# The dev set-up in an image: the same requirements.txt (torch's CPU build), requirements-data.txt
# (open_clip's CLIP vocabulary for the small model; the real tritonserver 2.51 with the Python
# backend from the nvidia-pytriton wheel), this project. The model and its CPU repository are built
# at pod start (deploy/overlays/cpu-smoke).
FROM python:3.11.14-slim-bookworm AS cpu-smoke
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/distrifusion
COPY requirements.txt requirements-data.txt deploy/docker/image-constraints.txt ./
# torch==2.13.0 resolves to 2.13.0+cpu from PyTorch's CPU index (a CPU build, as in the dev set-up).
RUN python3 -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.txt -c image-constraints.txt setuptools==84.2.1 \
    && python3 -m pip install --no-cache-dir --no-deps -r requirements-data.txt
COPY pyproject.toml ./
COPY backend/ backend/
# The wheel's server tree with this Python's backend stub (what scripts/triton_server.sh does).
RUN python3 -m pip install --no-cache-dir --no-deps --no-build-isolation . \
    && site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && cp -r "$site/pytriton/tritonserver" /opt/tritonserver \
    && cp "$site/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
        /opt/tritonserver/backends/python/ \
    && ln -s "$site/nvidia_pytriton.libs" /opt/tritonserver/libs
COPY build_engines/ build_engines/
COPY model_repository/ model_repository/
COPY deploy/docker/ deploy/docker/
RUN chmod 0755 deploy/docker/entrypoint.sh \
    && groupadd --gid 10001 distrifusion \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin distrifusion
# The stub embeds the first python3 on PATH and loads its libpython from LD_LIBRARY_PATH.
ENV PATH=/opt/tritonserver/bin:$PATH \
    LD_LIBRARY_PATH=/usr/local/lib:/opt/tritonserver/libs \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DISTRIFUSION_OPERATOR_KEY_FILE=/run/secrets/distrifusion/operator-key
VOLUME ["/models"]
EXPOSE 8000 8001 8002 8003
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
ENTRYPOINT ["/opt/distrifusion/deploy/docker/entrypoint.sh"]
CMD ["tritonserver", \
     "--model-repository=/models/repository", \
     "--backend-directory=/opt/tritonserver/backends", \
     "--model-control-mode=explicit", \
     "--load-model=sdxl", \
     "--load-model=sdxl_stream", \
     "--load-model=vae_decoder_whole", \
     "--load-model=vae_decoder_tile_statistics", \
     "--load-model=vae_decoder_tiles", \
     "--load-model=vae_encoder", \
     "--load-model=vae_encoder_whole", \
     "--load-model=vae_encoder_tile_statistics", \
     "--load-model=vae_encoder_tiles", \
     "--strict-readiness=true", \
     "--exit-on-error=true", \
     "--http-port=8000", \
     "--grpc-port=8001", \
     "--metrics-port=8002", \
     "--allow-metrics=true", \
     "--allow-gpu-metrics=false", \
     "--allow-cpu-metrics=true", \
     "--exit-timeout-secs=930", \
     "--backend-config=python,shm-default-byte-size=16777216", \
     "--backend-config=python,shm-growth-byte-size=67108864"]

# --- server (default target): tritonserver on the model repository volume ---------------------
# The model repository (TensorRT engines + UNet weights) is a volume mounted at /models/repository,
# built once per GPU model and TensorRT version by the engine-build Job, never at start-up.
# Flags: the ensemble and the VAE engines its vae_decoder stage calls (BLS: explicit model control
# loads an ensemble's own steps only); ports 8000 (HTTP) 8001 (gRPC) 8002 (metrics), metrics on
# (GPU + CPU), 8003 the supervisor's metrics; the operator's key read from
# $DISTRIFUSION_OPERATOR_KEY_FILE (a mounted Secret: docs/security.md); exit timeout 930 s, longer
# than the longest request (900 s at the largest build, 4096 x 4096: README "Values"); pinned host
# memory 1 GiB for the CPU<->GPU copies around the Python stages; Python-backend shared memory in
# /dev/shm starting at 16 MiB per stub and growing by 64 MiB (a 4 x 4096 x 4096 uint8 image batch
# is 192 MiB). The entrypoint adds --cuda-memory-pool-byte-size=<gpu>:$CUDA_MEMORY_POOL_BYTE_SIZE
# for each visible GPU: 1 GiB holds the GPU tensors between stages (text embeddings, latents,
# images: about 210 MiB per batch of four 4096 x 4096 requests) of 4 batches in flight, where
# Triton's default is 64 MiB.
FROM base AS server
VOLUME ["/models/repository"]
EXPOSE 8000 8001 8002 8003
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# The NGC image's own entrypoint first (it sets up CUDA forward compatibility on older drivers and
# then runs its arguments), then ours; the engine-build Job's containers chain it the same way.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/distrifusion/deploy/docker/entrypoint.sh"]
CMD ["tritonserver", \
     "--model-repository=/models/repository", \
     "--model-control-mode=explicit", \
     "--load-model=sdxl", \
     "--load-model=sdxl_stream", \
     "--load-model=vae_decoder_whole", \
     "--load-model=vae_decoder_tile_statistics", \
     "--load-model=vae_decoder_tiles", \
     "--load-model=vae_encoder", \
     "--load-model=vae_encoder_whole", \
     "--load-model=vae_encoder_tile_statistics", \
     "--load-model=vae_encoder_tiles", \
     "--strict-readiness=true", \
     "--exit-on-error=true", \
     "--http-port=8000", \
     "--grpc-port=8001", \
     "--metrics-port=8002", \
     "--allow-metrics=true", \
     "--allow-gpu-metrics=true", \
     "--allow-cpu-metrics=true", \
     "--exit-timeout-secs=930", \
     "--pinned-memory-pool-byte-size=1073741824", \
     "--backend-config=python,shm-default-byte-size=16777216", \
     "--backend-config=python,shm-growth-byte-size=67108864"]
