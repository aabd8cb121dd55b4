"""The UNet stage's memory check: what one generation needs, measured at load, against what the
device has free when a request comes.

A rank's working memory is a fixed part (time and text embeddings, the scheduler, per-shape
bookkeeping) plus a part that grows with the image: its band's activations and the full-size stale
activations that displaced patch parallelism keeps (every attention layer's keys and values, every
convolution's halo), in bytes per UNet input row (a prompt, twice under classifier-free guidance)
per latent pixel. A size the group ran lately still holds its buffers (the exchange's, the step
graphs'), so running it again needs less than a new size; both are measured. The group measures on
rank 0, the largest band, the peak growth of a generation: the fixed part from a generation at the
smallest size it runs (after a first one has paid for the process's one-time set-up), the growing
part from the two generations of every warm-up size (the first a new size, the second a held one).
The estimate for a size interpolates those measurements linearly in its row-pixels (from the fixed
part at none), beyond the largest it grows in proportion from the fixed part, and it carries a
margin (:data:`MARGIN`, :data:`SLACK_BYTES`). A request whose estimate exceeds the free memory is
refused before any rank starts, naming its size and the largest that fits; without a warm-up
nothing was measured and nothing is refused.

What "peak growth" and "free" mean per device:

- CPU: the process's peak resident memory (after giving freed memory back to the system) over its
  resident memory before; free is the machine's available memory over the ranks that share it.
- CUDA: the growth of what the caching allocator reserves, after emptying its cache. Under CUDA
  graphs a step's captured activations live in the graphs' private pool and the eager steps' in the
  general pool; the two never share blocks, so the reserved memory grows by about twice the
  activation peak while the allocated peak shows it once. Free is the driver's free memory plus the
  general pool's unused cached blocks; the private pool's cached blocks serve only its graphs
  (torch's CUDA semantics notes, "Graph memory management"; ``memory_snapshot`` names each
  segment's pool).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import gc
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

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
            return free + unused_general_pool_bytes(torch.cuda.memory_snapshot(), device.index or 0)

        return cuda_free
    return lambda: _proc_bytes("/proc/meminfo", "MemAvailable:") // ranks_sharing


GENERAL_POOL = (0, 0)
"""The caching allocator's pool id of ordinary allocations (CUDA graphs' pools have others)."""


def unused_general_pool_bytes(segments: Iterable[Mapping[str, Any]], device_index: int) -> int:
    """Bytes the caching allocator holds unused in its general pool on one device, from
    ``torch.cuda.memory_snapshot()``: what an eager allocation can take without asking the driver."""
    return sum(
        segment["total_size"] - segment["allocated_size"]
        for segment in segments
        if segment.get("device", device_index) == device_index
        and tuple(segment.get("segment_pool_id", GENERAL_POOL)) == GENERAL_POOL
    )


@contextlib.contextmanager
def peak_growth(device: torch.device) -> Iterator[list[int]]:
    """Yields a list that holds, once the block ends, the peak bytes the block added."""
    measured: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # Cached blocks would be reused without growing the reservation: release them first, so
        # that the growth counts everything the block needs, in every pool.
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield measured
        torch.cuda.synchronize(device)
        measured.append(max(0, torch.cuda.max_memory_reserved(device) - before))
        return
    # Freed memory that malloc keeps resident would be reused without growing the RSS: give it
    # back first (with what only the garbage collector frees), so that the growth counts
    # everything the block allocates.
    gc.collect()
    _LIBC.malloc_trim(0)
    before = _proc_bytes("/proc/self/status", "VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    yield measured
    measured.append(max(0, _proc_bytes("/proc/self/status", "VmHWM:") - before))


MARGIN = 1.5
"""Estimates are this much above the measured model, for fragmentation and for the spread of one
generation's peak measured at different times (on the CPU, what malloc keeps resident depends on
what ran before: the same request grew the resident memory by up to 1.5 times more after a larger
one, on the tiny model)."""
SLACK_BYTES = 4 << 20
"""And this much more: malloc's arenas and the caching allocator's blocks move a peak by a few MiB
either way, which matters only for the smallest generations."""


@dataclasses.dataclass
class UNetMemory:
    free: FreeMemory
    pixels_per_latent: int
    fixed_bytes: float = 0.0
    """What a generation of the smallest size added (0 before it was measured)."""
    measured: dict[bool, dict[int, int]] = dataclasses.field(default_factory=dict)
    """Peak growth by row-pixels, for new sizes (False) and held ones (True): the largest of each."""

    def _row_pixels(self, rows: int, height: int, width: int) -> int:
        return rows * (height // self.pixels_per_latent) * (width // self.pixels_per_latent)

    def record_fixed(self, peak_bytes: int) -> None:
        """The peak growth of a generation at the smallest size (its pixels count as nothing)."""
        self.fixed_bytes = float(peak_bytes)

    def record(self, rows: int, height: int, width: int, peak_bytes: int, held: bool) -> None:
        points = self.measured.setdefault(held, {})
        row_pixels = self._row_pixels(rows, height, width)
        points[row_pixels] = max(peak_bytes, points.get(row_pixels, 0))

    def _model(self, row_pixels: int, held: bool) -> float | None:
        # A held size never needs more than a new one: without its own figures, a new size's count.
        points = self.measured.get(held) or self.measured.get(False)
        if not points:
            return None
        xs, ys, highest = [0], [self.fixed_bytes], self.fixed_bytes
        for x in sorted(points):
            highest = max(highest, points[x])  # never less for more pixels
            xs.append(x)
            ys.append(highest)
        if row_pixels >= xs[-1]:
            return self.fixed_bytes + (ys[-1] - self.fixed_bytes) * row_pixels / xs[-1]
        upper = bisect.bisect_right(xs, row_pixels)
        share = (row_pixels - xs[upper - 1]) / (xs[upper] - xs[upper - 1])
        return ys[upper - 1] + share * (ys[upper] - ys[upper - 1])

    def estimate(self, rows: int, height: int, width: int, held: bool = False) -> int | None:
        model = self._model(self._row_pixels(rows, height, width), held)
        return None if model is None else math.ceil(MARGIN * model + SLACK_BYTES)

    def check(self, rows: int, height: int, width: int, held: bool = False) -> None:
        """Raises ConfigError when a generation of ``rows`` UNet rows at ``width`` x ``height`` pixels
        (``held``: a size whose buffers the group holds) would not fit in the memory free now."""
        needed = self.estimate(rows, height, width, held)
        if needed is None:
            return
        free = self.free()
        if needed <= free:
            return
        fitting = [side for side in range(64, 16385, 64) if (self.estimate(rows, side, side) or 0) <= free]
        largest = f"{fitting[-1]}x{fitting[-1]}" if fitting else "none"
        raise ConfigError(
            f"width, height: a {width}x{height} generation of {rows} UNet row(s) needs about "
            f"{needed / 2**30:.1f} GiB per rank, {free / 2**30:.1f} GiB is free; the largest square "
            f"size that fits at this batch now: {largest}"
        )
