"""The fixed cost of a band, counted without a GPU: operators dispatched by one steady band step.

The full-size SDXL base UNet is built on the ``meta`` device (shapes only: no weights, no
arithmetic), so it runs on any machine in seconds. For each mode and band count it counts the ATen
operators of one step of the plain UNet on a band-tall latent and of the engine's simulated band
(band 1, steady state: asynchronous but in full_sync, CFG batch 2, fp16), views and allocations left out.
The simulated all-gather is one copy, as it is one NCCL kernel on GPUs. On a GPU
each counted operator is about one kernel launch, the cost that dominates a band step at 1024²
(BENCHMARKS.md "GPU"); ``gpu_band_kernels.py`` counts the real kernels where a GPU is lent.

    python benchmarks/band_operator_counts.py [--output benchmarks/results/band_operator_counts.json]

Writes the JSON and the "Operators per band step" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.band_simulation import endless_generation, simulate, simulated_band_unet
from benchmarks.gpu_sdxl_unet import SDXL_BASE_UNET_CONFIG, build_unet, call_unet, make_inputs
from benchmarks.harness import replace_section, write_json
from distrifusion.config import DistriConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "band_operator_counts.json"
SECTION = "## Operators per band step"
RESOLUTION = 1024
CASES = [("corrected_async_gn", 2), ("corrected_async_gn", 3), ("stale_gn", 2), ("full_sync", 2)]
_NOT_KERNELS = (
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
)


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it by name, views and allocations left out."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if not func.is_view and func not in _NOT_KERNELS:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_case(
    mode: str, bands: int, unet_config: dict[str, Any] = SDXL_BASE_UNET_CONFIG, resolution: int = RESOLUTION
) -> dict[str, Any]:
    """Operators of one plain band-tall UNet step and one steady engine band step (band 1 of ``bands``)."""
    device = torch.device("meta")
    unet = build_unet(unet_config, device, torch.float16, seed=0)
    inputs = make_inputs(unet_config, resolution, device, torch.float16, seed=0)
    band_rows = inputs["sample"].shape[2] // bands
    with OperatorCount() as plain:
        call_unet(unet, dict(inputs, sample=inputs["sample"][:, :, :band_rows].contiguous()))
    # The config's device places nothing here: the UNet's meta parameters decide.
    config = DistriConfig(mode=mode, warmup_steps=4, dtype="fp16", device="cpu", cuda_graphs=False)
    engine = simulated_band_unet(unet, config)
    simulate(engine, bands, 1)
    engine.begin_generation(endless_generation())
    for _ in range(config.warmup_steps + 3):  # past the warm-up and the step recording the batches
        call_unet(engine, inputs)
    with OperatorCount() as band:
        call_unet(engine, inputs)
    grown = {
        name: [plain.counts[name], band.counts[name]]
        for name in band.counts
        if band.counts[name] > plain.counts[name]
    }
    return {
        "mode": mode,
        "bands": bands,
        "plain": sum(plain.counts.values()),
        "band": sum(band.counts.values()),
        "grown": dict(sorted(grown.items(), key=lambda item: item[1][0] - item[1][1])),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | band of | plain UNet, band-tall latent | engine's band | extra | largest growth (plain → band) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        growth = ", ".join(f"{name} {p} → {b}" for name, (p, b) in list(result["grown"].items())[:5])
        lines.append(
            f"| {result['mode']} | {result['bands']} | {result['plain']} | {result['band']} | "
            f"{result['band'] - result['plain']} | {growth} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    results = [count_case(mode, bands) for mode, bands in CASES]
    write_json(args.output, {"resolution": RESOLUTION, "dtype": "fp16", "results": results})
    body = (
        f"`python benchmarks/band_operator_counts.py` (SDXL base UNet on the meta device, {RESOLUTION}², "
        "CFG batch 2, fp16, band 1 in the steady state (asynchronous but in full_sync), eager): ATen operators of one "
        "step, views and allocations left out; on a GPU about one kernel each. Any machine gives the "
        "same counts.\n\n" + table(results)
    )
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
