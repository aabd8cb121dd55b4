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
