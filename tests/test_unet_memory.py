"""The UNet stage's memory check: the estimate against what generations really take, on CPU ranks;
and what it reads on CUDA (the caching allocator's pools), against a stand-in of the allocator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distrifusion.config import DistriConfig
from distrifusion.serving import memory
from distrifusion.serving.denoise import DenoiseRequest, warmup_request
from distrifusion.serving.memory import GENERAL_POOL, free_memory, peak_growth, unused_general_pool_bytes
from distrifusion.serving.unet_group import UNetGroup

SIZES = ((640, 640), (512, 512))  # largest first, as the stage warms up


@pytest.fixture(scope="module")
def group(tiny_sdxl_dir: Path) -> Iterator[UNetGroup]:
    unet_group = UNetGroup(str(tiny_sdxl_dir), DistriConfig(), ranks=2, threads_per_rank=1)
    for height, width in SIZES:
        unet_group.warm_up(height, width, 77)
    yield unet_group
    unet_group.close()


def request(group: UNetGroup, height: int, width: int) -> DenoiseRequest:
    return warmup_request(group.pipeline.unet.config, height, width, 77, steps=8)


def test_at_every_warmed_size_the_estimate_is_within_twice_the_peak(group: UNetGroup) -> None:
    """For a new size (the warm-up's first generation of it) and for a size whose buffers the group
    holds (its second), in corrected_async_gn, the served default."""
    assert group.memory.fixed_bytes > 0, "the calibration measured the fixed part"
    for height, width in SIZES:
        row_pixels = 2 * (height // 8) * (width // 8)
        for held in (False, True):
            measured = group.memory.measured[held][row_pixels]
            estimate = group.memory.estimate(2, height, width, held)
            assert measured <= estimate <= 2 * measured, (height, width, held, measured, estimate)


def test_later_requests_of_warmed_and_new_sizes_stay_under_their_estimates(group: UNetGroup) -> None:
    for height, width in (*SIZES, (384, 320), *SIZES):
        generation = request(group, height, width)
        held = group._holds(generation)
        estimate = group.memory.estimate(2, height, width, held)
        with peak_growth(group.pipeline.unet.device) as peak:
            group.denoise(generation)
        assert peak[0] <= estimate <= 2 * peak[0] + memory.SLACK_BYTES, (
            height,
            width,
            held,
            peak[0],
            estimate,
        )


@contextlib.contextmanager
def cuda_allocator_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """What peak_growth and free_memory read of torch.cuda, as a dictionary a test changes."""
    state = {
        "reserved": 0,
        "peak_reserved": 0,
        "allocated": 0,
        "peak_allocated": 0,
        "segments": [],
        "free": 0,
    }

    def reset_peaks(device: object = None) -> None:
        state["peak_reserved"], state["peak_allocated"] = state["reserved"], state["allocated"]

    def empty_cache() -> None:
        # Releases whole unused segments of every pool; the graphs' blocks in use stay.
        kept = [s for s in state["segments"] if s["allocated_size"]]
        state["reserved"] = sum(s["total_size"] for s in kept)
        state["segments"] = kept

    for name, value in {
        "synchronize": lambda device=None: None,
        "empty_cache": empty_cache,
        "reset_peak_memory_stats": reset_peaks,
        "memory_reserved": lambda device=None: state["reserved"],
        "max_memory_reserved": lambda device=None: state["peak_reserved"],
        "memory_allocated": lambda device=None: state["allocated"],
        "max_memory_allocated": lambda device=None: state["peak_allocated"],
        "mem_get_info": lambda device=None: (state["free"], 80 << 30),
        "memory_snapshot": lambda: state["segments"],
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    yield state


def test_on_cuda_the_growth_counts_both_pools_of_a_captured_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step captured as a CUDA graph keeps its activations in the graphs' private pool while the
    eager steps' come from the general pool: the reservation grows by both, the allocated peak
    shows one."""
    activations = 3 << 30
    with cuda_allocator_stand_in(monkeypatch) as state, peak_growth(torch.device("cuda", 0)) as peak:
        # An eager step: activations from the general pool, freed after (the blocks stay cached).
        state["reserved"] += activations
        state["allocated"] += activations
        state["peak_reserved"] = state["reserved"]
        state["peak_allocated"] = state["allocated"]
        state["allocated"] -= activations
        # The captured step: the same activations again, in the private pool.
        state["reserved"] += activations
        state["allocated"] += activations
        state["peak_reserved"] = state["reserved"]
        state["allocated"] -= activations
    assert peak == [2 * activations]


def test_on_cuda_only_the_general_pools_unused_blocks_count_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    segments = [
        {"device": 0, "segment_pool_id": GENERAL_POOL, "total_size": 8 << 30, "allocated_size": 2 << 30},
        # The graphs' private pool: its unused blocks serve only its graphs' captures.
        {"device": 0, "segment_pool_id": (1, 0), "total_size": 6 << 30, "allocated_size": 1 << 30},
        {"device": 1, "segment_pool_id": GENERAL_POOL, "total_size": 4 << 30, "allocated_size": 0},
    ]
    assert unused_general_pool_bytes(segments, 0) == 6 << 30
    with cuda_allocator_stand_in(monkeypatch) as state:
        state.update(segments=segments, free=10 << 30, reserved=18 << 30, allocated=3 << 30)
        assert free_memory(torch.device("cuda", 0), 1)() == (10 << 30) + (6 << 30)
