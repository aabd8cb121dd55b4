"""The GPU tier: run on a machine with CUDA (scripts/gpu_check.sh); skipped elsewhere.

    python -m pytest -m gpu tests/gpu

Models are small SDXL-structured UNets with random weights, built on the GPU from configs.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
