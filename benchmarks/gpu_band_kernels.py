"""Where a band's step time goes on one GPU: CUDA kernels of the plain UNet on a band-tall latent
against the engine's simulated band (band 1 of 2, steady asynchronous state), SDXL UNet, fp16, 1024².

    python benchmarks/gpu_band_kernels.py [--compile inductor]     # on the GPU machine, about 30 s

Eager (or both compiled by ``torch.compile`` with ``--compile``), under torch.profiler; prints the kernel count and summed kernel time of each, and the kernels
whose time grows most from the plain band to the engine's band.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch

from benchmarks.band_simulation import endless_generation, simulate, simulated_band_unet
from benchmarks.gpu_sdxl_unet import SDXL_BASE_UNET_CONFIG, build_unet, call_unet, make_inputs
from distrifusion.config import DistriConfig

RESOLUTION = 1024
BAND_ROWS = RESOLUTION // 8 // 2


def kernel_times(fn: Callable[[], torch.Tensor]) -> dict[str, list[float]]:
    """Kernel name -> [count, summed device ms] over one call of ``fn`` (after three warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    stats: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = stats[event.name[:90]]
            entry[0] += 1
            entry[1] += event.device_time_total / 1e3
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", metavar="BACKEND", help="compile both with torch.compile")
    backend = parser.parse_args(argv).compile
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    unet = build_unet(SDXL_BASE_UNET_CONFIG, device, torch.float16, seed=0)
    inputs = make_inputs(SDXL_BASE_UNET_CONFIG, RESOLUTION, device, torch.float16, seed=0)
    band_inputs = dict(inputs, sample=inputs["sample"][:, :, :BAND_ROWS].contiguous())
    plain_unet = torch.compile(unet, backend=backend, dynamic=False, fullgraph=True) if backend else unet
    plain = kernel_times(lambda: call_unet(plain_unet, band_inputs))

    engine = simulated_band_unet(
        unet,
        DistriConfig(
            mode="corrected_async_gn",
            warmup_steps=4,
            dtype="fp16",
            device="cuda",
            cuda_graphs=False,
            compile=backend or False,
        ),
    )
    simulate(engine, 2, 1)
    engine.begin_generation(endless_generation())
    for _ in range(7):  # past the warm-up steps and the recording step
        call_unet(engine, inputs)
    band = kernel_times(lambda: call_unet(engine, inputs))

    for name, stats in ((f"plain UNet, {BAND_ROWS}-row latent", plain), ("engine band 1 of 2", band)):
        count = sum(int(v[0]) for v in stats.values())
        print(f"{name}: {count} kernels, {sum(v[1] for v in stats.values()):.2f} ms of kernel time")
    growth = sorted(
        set(plain) | set(band), key=lambda k: plain.get(k, [0, 0.0])[1] - band.get(k, [0, 0.0])[1]
    )
    print(f"{'kernel':90s} {'plain n':>8s} {'ms':>7s} {'band n':>7s} {'ms':>7s}")
    for name in growth[:30]:
        p, b = plain.get(name, [0, 0.0]), band.get(name, [0, 0.0])
        print(f"{name:90s} {int(p[0]):8d} {p[1]:7.2f} {int(b[0]):7d} {b[1]:7.2f}")


if __name__ == "__main__":
    main()
