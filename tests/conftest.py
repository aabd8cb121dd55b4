"""Shared fixtures: tiny random-weight pipelines saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from distrifusion.tiny_model import save_tiny_model


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny SDXL pipeline (seed 0), in save_pretrained layout."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), arch="sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny SD 1.5 pipeline (seed 0), in save_pretrained layout."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd15"), arch="sd15", seed=0)


# The serving tests share one CPU server (distrifusion.serving.cpu_server.shared_cpu_server). The
# soak must see it fresh: after the 2048² and 3072x1024 requests of test_high_resolution the
# allocators hold pools large enough to absorb a leak the soak is there to catch.
_FIRST_ON_THE_SHARED_SERVER = "test_soak.py"
_SHARED_SERVER_MODULES = (
    "test_high_resolution.py",
    "test_image_to_image.py",
    "test_perf_analyzer.py",
    "test_server_security.py",
    "test_streaming.py",
    "test_triton_server.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    soak = [item for item in items if item.path.name == _FIRST_ON_THE_SHARED_SERVER]
    if not soak:
        return
    rest = [item for item in items if item.path.name != _FIRST_ON_THE_SHARED_SERVER]
    first_shared = next(
        (i for i, item in enumerate(rest) if item.path.name in _SHARED_SERVER_MODULES), len(rest)
    )
    items[:] = rest[:first_shared] + soak + rest[first_shared:]
