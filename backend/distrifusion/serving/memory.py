"""The UNet stage's memory check: what one generation needs, measured at load, against what the
device has free when a request comes.

A rank's working memory grows with the image: its band's activations and the full-size stale
activations that displaced patch parallelism keeps (every attention layer's keys and values, every
convolution's halo), so it is measured in bytes per UNet input row (a prompt, twice under
classifier-free guidance) per latent pixel of the image. The warm-up generations measure it on rank
0, the largest band, as the peak over the memory before (the CUDA allocator's peak, or on the CPU
the process's peak resident memory); the fixed part of that peak counts as if it grew with the
size, which overestimates larger images, never underestimates them. A request whose estimate
exceeds the free memory (CUDA: free plus what the allocator holds unused; CPU: the machine's
available memory over the ranks that share it) is refused before any rank starts, naming its size
and the largest that fits; without a warm-up nothing was measured and nothing is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..config import ConfigError

_LIBC = ctypes.CDLL(None)  # glibc, for malloc_trim

FreeMemory = Callable[[], int]
"""Bytes one rank may still use now."""


def _proc_bytes(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``/proc/self/status``, ``/proc/meminfo``), in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise OSError(f"{path} has no {field}")


def free_memory(device: torch.device, ranks_sharing: int) -> FreeMemory:
    if device.type == "cuda":

        def cuda_free() -> int:
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

        return cuda_free
    return lambda: _proc_bytes("/proc/meminfo", "MemAvailable:") // ranks_sharing


@contextlib.contextmanager
def peak_growth(device: torch.device) -> Iterator[list[int]]:
    """Yields a list that holds, once the block ends, the peak bytes the block added."""
    measured: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield measured
        torch.cuda.synchronize(device)
        measured.append(torch.cuda.max_memory_allocated(device) - before)
        return
    # Freed memory that malloc keeps resident would be reused without growing the RSS: give it
    # back first, so that the growth counts everything the block allocates.
    _LIBC.malloc_trim(0)
    before = _proc_bytes("/proc/self/status", "VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    yield measured
    measured.append(max(0, _proc_bytes("/proc/self/status", "VmHWM:") - before))


@dataclasses.dataclass
class UNetMemory:
    free: FreeMemory
    pixels_per_latent: int
    bytes_per_row_pixel: float | None = None
    """The largest measured, None before any warm-up."""

    def _latent_pixels(self, height: int, width: int) -> int:
        return (height // self.pixels_per_latent) * (width // self.pixels_per_latent)

    def record(self, rows: int, height: int, width: int, peak_bytes: int) -> None:
        value = peak_bytes / (rows * self._latent_pixels(height, width))
        self.bytes_per_row_pixel = max(value, self.bytes_per_row_pixel or 0.0)

    def estimate(self, rows: int, height: int, width: int) -> int | None:
        if self.bytes_per_row_pixel is None:
            return None
        return math.ceil(self.bytes_per_row_pixel * rows * self._latent_pixels(height, width))

    def check(self, rows: int, height: int, width: int) -> None:
        """Raises ConfigError when a generation of ``rows`` UNet rows at ``width`` x ``height`` pixels
        would not fit in the memory free now."""
        needed = self.estimate(rows, height, width)
        if needed is None:
            return
        free = self.free()
        if needed <= free:
            return
        assert self.bytes_per_row_pixel is not None
        latent_side = math.sqrt(free / (self.bytes_per_row_pixel * rows))
        side = 64 * int(latent_side * self.pixels_per_latent // 64)
        largest = f"{side}x{side}" if side >= 64 else "none"
        raise ConfigError(
            f"width, height: a {width}x{height} generation of {rows} UNet row(s) needs about "
            f"{needed / 2**30:.1f} GiB per rank, {free / 2**30:.1f} GiB is free; the largest square "
            f"size that fits at this batch now: {largest}"
        )
