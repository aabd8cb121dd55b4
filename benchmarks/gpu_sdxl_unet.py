"""Full-size SDXL UNet on one GPU: plain diffusers vs DistriUNet, and a simulated band of n GPUs.

Prepared for a lent single-GPU machine (one H100 or H200); one run takes a few minutes:

    python benchmarks/gpu_sdxl_unet.py                      # fp16, CUDA, 1024^2 and 2048^2
    python benchmarks/gpu_sdxl_unet.py --dry-run            # tiny UNet on the CPU, seconds: checks the code path

It builds the SDXL base 1.0 UNet (2.6 B parameters, config written out below from the public
``unet/config.json`` of stabilityai/stable-diffusion-xl-base-1.0) with random weights, directly on
the GPU, and measures per UNet step (batch 2 = one prompt with classifier-free guidance):

1. the plain diffusers UNet;
2. DistriUNet at 1 rank, eager, and with ``cuda_graphs=True`` (on CUDA);
3. SIMULATED: the compute of one band of n = 2, 4, 8 bands in the steady (asynchronous) state
   (with ``--compile``, also compiled by ``torch.compile``, with CUDA graphs; against the plain UNet
   compiled, as one CUDA graph);
   One process (world 1) runs a DistriUNet whose topology says "n ranks, I am band r" and whose
   all-gathers are replaced by a local copy replicating this rank's tensor n times. The layers do
   exactly the work a rank of an n-GPU group does (its band, halos, full-image keys/values, moment
   merging, the batched send/receive buffers), but nothing crosses an interconnect, NCCL kernels do
   not compete for SMs, and the "other bands" are this band's data. It is a measurement of the
   compute only; the multi-GPU latency is a projection from it:

       step ~= max(band compute, async bytes received / bandwidth + latency per collective)
               + output-gather bytes received / bandwidth + latency

   with the bytes per step counted by the engine's own ExchangeStats during the simulated steps
   (of replayed CUDA graphs too: their host calls run, and count, at every replay).
   The bandwidths are arguments (defaults: NVLink 4 on H100 SXM, 450 GB/s per direction per GPU;
   PCIe Gen5 x16, about 55 GB/s). Real runs will be slower by whatever this leaves out.

JSON goes to $OUT/gpu_sdxl_unet.json when the environment variable OUT is set, else to
benchmarks/results/; a table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from benchmarks.band_simulation import endless_generation, simulate, simulated_band_unet
from benchmarks.harness import machine_info, write_json
from distrifusion.config import DTYPES, ConfigError, DistriConfig, Mode
from distrifusion.geometry import BandLayout
from distrifusion.unet import DistriUNet

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers UNet2DConditionModel).
# 2,567,463,684 parameters. Written out as data: no download.
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    # 1280 (text_encoder_2's pooled projection) + 6 micro-conditioning numbers x 256.
    "projection_class_embeddings_input_dim": 2816,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}

# For --tiny (CPU smoke runs): the same structure, narrow.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_BASE_UNET_CONFIG,
    "block_out_channels": [32, 64, 128],
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 8],  # diffusers' name: heads per block (16 channels per head)
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}

INTERCONNECTS_GBPS = {"nvlink4_h100_sxm": 450.0, "pcie_gen5_x16": 55.0}
TEXT_TOKENS = 77


# --------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Times a callable on the GPU with CUDA events (after a synchronize), else with perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Seconds ``fn`` took, its device work included."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def median_seconds(timer: Timer, fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    times = [timer(fn) for _ in range(iters)]
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times}


# --------------------------------------------------------------------------------------------------
# Model and inputs


def build_unet(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> UNet2DConditionModel:
    """Random weights, built on ``device`` (no CPU copy of 2.6 B parameters), then cast to ``dtype``.

    Built in fp32 and cast: the initialisers are the well-tested fp32 ones, and the transient fp32
    copy (about 10 GiB at full size) fits any H100.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def make_inputs(
    config: dict[str, Any], resolution: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    """One prompt with CFG: UNet batch 2, latent resolution/8, SDXL conditioning shapes."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = resolution // 8
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, dtype=dtype)
    return {
        "sample": randn(2, config["in_channels"], latent, latent),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": randn(2, TEXT_TOKENS, config["cross_attention_dim"]),
        "added_cond_kwargs": {"text_embeds": randn(2, pooled), "time_ids": time_ids.to(device)},
    }


def call_unet(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=inputs["added_cond_kwargs"],
            return_dict=False,
        )[0]


def captured_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured as one CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def fastest_plain_s(entry: dict[str, Any]) -> float:
    """The 1-GPU baseline that speedups are against: plain diffusers, eager or one CUDA graph."""
    keys = ("plain", "plain_cuda_graphs", "plain_compiled")
    return min(entry[key]["median_s"] for key in keys if key in entry)


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class Args:
    device: torch.device
    dtype: torch.dtype
    dtype_name: str
    unet_config: dict[str, Any]
    resolutions: list[int]
    bands: list[int]
    band_index: str
    mode: str
    warmup_steps: int
    warmup_iters: int
    iters: int
    bandwidths_gbps: dict[str, float]
    collective_latency_us: float
    seed: int
    cuda_graphs: bool
    compile: str | None
    budget_s: float
    started: float

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def engine_config(args: Args, cuda_graphs: bool, compile: str | None = None) -> DistriConfig:
    return DistriConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        dtype=args.dtype_name,
        device=args.device.type,
        cuda_graphs=cuda_graphs,
        compile=compile or False,
    )


def steady_band(unet: DistriUNet, inputs: dict[str, Any], args: Args, world: int, timer: Timer) -> dict:
    """Median compute time of one band of ``world`` in the asynchronous steady state, and its bytes."""
    rank = {"first": 0, "last": world - 1, "middle": world // 2}[args.band_index]
    simulate(unet, world, rank)
    unet.begin_generation(endless_generation())

    def step() -> torch.Tensor:
        return call_unet(unet, inputs)

    # Steps 0..warmup_steps synchronous, then the first asynchronous step records the batches.
    for _ in range(args.warmup_steps + 2):
        step()
    step()  # one steady step, counted by the engine's own stats (replayed graphs count too)
    record = unet.steps[-1]
    if record.phase != "steady":
        raise RuntimeError(f"step {record.step} is a {record.phase} step, not a steady one")
    stats = dataclasses.asdict(record.communication)
    reset_peak_memory(args.device)
    timing = median_seconds(timer, step, args.warmup_iters, args.iters)
    timed = unet.steps[-args.iters :]
    latent = inputs["sample"].shape[-1]
    layout = BandLayout.split(latent, latent, world, len(args.unet_config["block_out_channels"]))
    # The output gather: every rank's band of the noise prediction, padded to the tallest band.
    out_sent = (
        inputs["sample"].shape[0]
        * args.unet_config["out_channels"]
        * layout.max_band_height()
        * latent
        * inputs["sample"].element_size()
    )
    return {
        "bands": world,
        "band_index": rank,
        "band_rows": layout.band_height(rank),
        "compute": timing,
        "steady_stats_per_step": stats,
        # A compiled band compiles on its first step and replays while timed; a recompile (a new
        # graph) inside the timed steps would put a compile into the figure.
        "ran_compiled": all(r.compiled for r in timed),
        "graphs_compiled": sum(r.new_graphs for r in unet.steps),
        "graphs_compiled_while_timed": sum(r.new_graphs for r in timed),
        "output_gather_bytes_sent": out_sent,
        "output_gather_bytes_received": out_sent * (world - 1),
        "peak_memory_gib": peak_memory_gib(args.device),
    }


def project(band: dict[str, Any], single_gpu_s: float, args: Args) -> dict[str, Any]:
    """Projected n-GPU step from the simulated band compute and the engine's byte counts."""
    stats = band["steady_stats_per_step"]
    latency = args.collective_latency_us * 1e-6
    out_received = band["output_gather_bytes_received"]
    async_received = stats["bytes_received"] - out_received
    async_collectives = max(stats["collectives"] - 1, 0)
    compute = band["compute"]["median_s"]
    projections = {}
    for name, gbps in args.bandwidths_gbps.items():
        bandwidth = gbps * 1e9
        comm_async = async_received / bandwidth + async_collectives * latency
        gather = out_received / bandwidth + latency
        step = max(compute, comm_async) + gather
        projections[name] = {
            "bandwidth_gbps": gbps,
            "async_comm_s": comm_async,
            "output_gather_s": gather,
            "step_s": step,
            "comm_bound": comm_async > compute,
            "speedup_vs_plain_1_gpu": single_gpu_s / step,
        }
    return projections


def run(args: Args) -> dict[str, Any]:
    timer = Timer(args.device)
    config = args.unet_config
    print(f"building the UNet on {args.device} ({args.dtype_name}) ...", flush=True)
    started = time.perf_counter()
    unet = build_unet(config, args.device, args.dtype, args.seed)
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in unet.parameters())
    print(f"  {parameters / 1e9:.3f} B parameters in {build_s:.1f} s", flush=True)
    graphs_supported, graphs_note = True, "implemented"
    if args.device.type != "cuda":
        graphs_supported, graphs_note = False, "CUDA graphs need device cuda"
    if not args.cuda_graphs:
        graphs_supported, graphs_note = False, "skipped (--no-cuda-graphs)"

    results: dict[int, dict[str, Any]] = {}
    inputs_by_res = {r: make_inputs(config, r, args.device, args.dtype, args.seed) for r in args.resolutions}

    # 1. Plain diffusers UNet, before DistriUNet rewires it in place.
    for resolution in args.resolutions:
        inputs = inputs_by_res[resolution]
        reset_peak_memory(args.device)
        plain = median_seconds(
            timer, lambda inputs=inputs, model=unet: call_unet(model, inputs), args.warmup_iters, args.iters
        )
        plain["peak_memory_gib"] = peak_memory_gib(args.device)
        # Random fp16 weights can overflow; timings stand either way, but say so.
        plain["output_finite"] = bool(torch.isfinite(call_unet(unet, inputs)).all())
        results[resolution] = {"resolution": resolution, "latent": resolution // 8, "plain": plain}
        print(f"  {resolution}^2 plain diffusers UNet: {plain['median_s'] * 1e3:.2f} ms/step", flush=True)
        if graphs_supported:
            # The fair baseline for the engine's graphs: eager Python launches bound small steps.
            replay = captured_graph(lambda inputs=inputs, model=unet: call_unet(model, inputs))
            results[resolution]["plain_cuda_graphs"] = median_seconds(
                timer, replay, args.warmup_iters, args.iters
            )
            del replay
            torch.cuda.empty_cache()
            print(
                f"  {resolution}^2 plain diffusers UNet, one CUDA graph: "
                f"{results[resolution]['plain_cuda_graphs']['median_s'] * 1e3:.2f} ms/step",
                flush=True,
            )

    # 2. and 3. DistriUNet (eager) at 1 rank, then the simulated bands; same weights, wrapped in place.
    eager = simulated_band_unet(unet, engine_config(args, cuda_graphs=False))
    skipped: list[str] = []
    for resolution in args.resolutions:
        entry = results[resolution]
        inputs = inputs_by_res[resolution]
        simulate(eager, 1, 0)
        eager.begin_generation(endless_generation())
        call_unet(eager, inputs)  # step 0 computes the text keys/values the later steps reuse
        reset_peak_memory(args.device)
        distri = median_seconds(
            timer, lambda inputs=inputs, model=eager: call_unet(model, inputs), args.warmup_iters, args.iters
        )
        distri["peak_memory_gib"] = peak_memory_gib(args.device)
        distri["overhead_vs_plain"] = distri["median_s"] / entry["plain"]["median_s"] - 1
        entry["distri_1_rank_eager"] = distri
        print(
            f"  {resolution}^2 DistriUNet 1 rank eager: {distri['median_s'] * 1e3:.2f} ms/step "
            f"({100 * distri['overhead_vs_plain']:+.1f} % vs plain)",
            flush=True,
        )
        entry["simulated_bands_eager"] = {}
        for world in args.bands:
            if args.over_budget():
                skipped.append(f"{resolution}^2 {world} bands eager (over budget)")
                continue
            try:
                band = steady_band(eager, inputs, args, world, timer)
            except ConfigError as error:
                skipped.append(f"{resolution}^2 {world} bands: {error}")
                continue
            band["projection"] = project(band, fastest_plain_s(entry), args)
            entry["simulated_bands_eager"][world] = band
            print(
                f"  {resolution}^2 band {band['band_index']} of {world} (simulated, eager): "
                f"{band['compute']['median_s'] * 1e3:.2f} ms/step, engine bytes/step "
                f"sent {band['steady_stats_per_step']['bytes_sent'] / 2**20:.1f} MiB, received "
                f"{band['steady_stats_per_step']['bytes_received'] / 2**20:.1f} MiB",
                flush=True,
            )
    del eager, unet
    if args.device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. CUDA graphs, where the engine has them: a fresh UNet (the wrapped one cannot be re-wrapped),
    # built only after the first is freed, so there is never more than one copy of the weights.
    graphs: dict[str, Any] = {"supported": graphs_supported, "note": graphs_note}
    if graphs_supported and not args.over_budget():
        try:
            graph_unet = simulated_band_unet(
                build_unet(config, args.device, args.dtype, args.seed), engine_config(args, cuda_graphs=True)
            )
            for resolution in args.resolutions:
                entry = results[resolution]
                inputs = inputs_by_res[resolution]
                simulate(graph_unet, 1, 0)
                graph_unet.begin_generation(endless_generation())
                # Past step 0 (text keys/values) and the warm-up phase, so that the steady-phase graph
                # is captured before timing starts, not inside a timed iteration.
                for _ in range(args.warmup_steps + 2):
                    call_unet(graph_unet, inputs)
                timing = median_seconds(
                    timer, lambda inputs=inputs: call_unet(graph_unet, inputs), args.warmup_iters, args.iters
                )
                timing["overhead_vs_plain"] = timing["median_s"] / entry["plain"]["median_s"] - 1
                entry["distri_1_rank_cuda_graphs"] = timing
                print(
                    f"  {resolution}^2 DistriUNet 1 rank CUDA graphs: {timing['median_s'] * 1e3:.2f} ms/step"
                )
                entry["simulated_bands_cuda_graphs"] = simulated_bands(
                    graph_unet, inputs, entry, args, timer, skipped, "CUDA graphs"
                )
        except (NotImplementedError, ConfigError, RuntimeError) as error:
            graphs["error"] = f"{type(error).__name__}: {error}"
            print(f"  CUDA graphs failed: {graphs['error']}", flush=True)
    compiled = compiled_section(args, results, graphs_supported, skipped) if args.compile else None
    return {
        "unet_parameters": parameters,
        "build_seconds": build_s,
        "cuda_graphs": graphs,
        "compiled": compiled,
        "resolutions": results,
        "skipped": skipped,
    }


def simulated_bands(
    unet: DistriUNet,
    inputs: dict[str, Any],
    entry: dict[str, Any],
    args: Args,
    timer: Timer,
    skipped: list[str],
    label: str,
) -> dict[int, dict[str, Any]]:
    """Every band count of ``args.bands`` that fits the budget and the latent, with projections."""
    resolution = entry["resolution"]
    bands: dict[int, dict[str, Any]] = {}
    for world in args.bands:
        if args.over_budget():
            skipped.append(f"{resolution}^2 {world} bands {label} (over budget)")
            continue
        with contextlib.suppress(ConfigError):
            band = steady_band(unet, inputs, args, world, timer)
            band["projection"] = project(band, fastest_plain_s(entry), args)
            bands[world] = band
            print(
                f"  {resolution}^2 band {band['band_index']} of {world} (simulated, {label}): "
                f"{band['compute']['median_s'] * 1e3:.2f} ms/step",
                flush=True,
            )
    return bands


def compiled_section(
    args: Args, results: dict[int, dict[str, Any]], graphs: bool, skipped: list[str]
) -> dict[str, Any]:
    """5. ``torch.compile`` (``args.compile``): the plain UNet compiled (as one CUDA graph where
    graphs run), then the engine's simulated bands compiled (with its CUDA graphs); a fresh UNet."""
    timer = Timer(args.device)
    section: dict[str, Any] = {"backend": args.compile, "compile_seconds": {}}
    try:
        unet = build_unet(args.unet_config, args.device, args.dtype, args.seed)
        plain = torch.compile(unet, backend=args.compile, dynamic=False, fullgraph=True)
        for resolution, entry in results.items():
            inputs = make_inputs(args.unet_config, resolution, args.device, args.dtype, args.seed)
            started = time.perf_counter()
            call_unet(plain, inputs)
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            section["compile_seconds"][f"plain {resolution}"] = time.perf_counter() - started

            def compiled_step(inputs: dict[str, Any] = inputs, model: Any = plain) -> torch.Tensor:
                return call_unet(model, inputs)

            step = captured_graph(compiled_step) if graphs else compiled_step
            entry["plain_compiled"] = median_seconds(timer, step, args.warmup_iters, args.iters)
            print(f"  {resolution}^2 plain compiled: {entry['plain_compiled']['median_s'] * 1e3:.2f} ms/step")
            del step, compiled_step
        del plain
        engine = simulated_band_unet(unet, engine_config(args, cuda_graphs=graphs, compile=args.compile))
        for resolution, entry in results.items():
            inputs = make_inputs(args.unet_config, resolution, args.device, args.dtype, args.seed)
            entry["simulated_bands_compiled"] = simulated_bands(
                engine, inputs, entry, args, timer, skipped, "compiled"
            )
    except Exception as error:  # a backend that cannot compile this model: reported, not fatal
        section["error"] = f"{type(error).__name__}: {error}"
        print(f"  compiled runs failed: {section['error']}", flush=True)
    return section


# --------------------------------------------------------------------------------------------------
# Reporting


def table(report: dict[str, Any]) -> str:
    bandwidths = list(report["settings"]["bandwidths_gbps"])
    header = (
        "| resolution | configuration | ms/step | vs fastest plain | engine MiB received/step/GPU | "
        + " | ".join(f"projected ms/step, speedup ({b})" for b in bandwidths)
        + " |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for resolution, entry in report["results"]["resolutions"].items():
        plain = fastest_plain_s(entry)
        blank = " | ".join("-" for _ in bandwidths)
        for key, label in (
            ("plain", "plain diffusers, 1 GPU, eager"),
            ("plain_cuda_graphs", "plain diffusers, 1 GPU, one CUDA graph"),
            ("distri_1_rank_eager", "DistriUNet 1 GPU, eager"),
            ("distri_1_rank_cuda_graphs", "DistriUNet 1 GPU, CUDA graphs"),
            ("plain_compiled", "plain diffusers, 1 GPU, compiled (one CUDA graph on GPUs)"),
        ):
            if key in entry:
                t = entry[key]["median_s"]
                lines.append(f"| {resolution}^2 | {label} | {t * 1e3:.2f} | {plain / t:.2f} | - | {blank} |")
        for key, label in (
            ("simulated_bands_eager", "eager"),
            ("simulated_bands_cuda_graphs", "CUDA graphs"),
            ("simulated_bands_compiled", "compiled (+ CUDA graphs on GPUs)"),
        ):
            for world, band in entry.get(key, {}).items():
                t = band["compute"]["median_s"]
                received = band["steady_stats_per_step"]["bytes_received"] / 2**20
                projected = " | ".join(
                    f"{p['step_s'] * 1e3:.2f}, {p['speedup_vs_plain_1_gpu']:.2f}x"
                    + (" (comm-bound)" if p["comm_bound"] else "")
                    for p in band.get("projection", {}).values()
                )
                lines.append(
                    f"| {resolution}^2 | SIMULATED band {band['band_index']} of {world}, {label} (compute only) | "
                    f"{t * 1e3:.2f} | {plain / t:.2f} | {received:.1f} | {projected or blank} |"
                )
    return "\n".join(lines)


def output_path(explicit: Path | None, tiny: bool) -> Path:
    if explicit is not None:
        return explicit
    name = "gpu_sdxl_unet_cpu_tiny.json" if tiny else "gpu_sdxl_unet.json"
    out = os.environ.get("OUT")
    if out:
        return Path(out) / name
    return Path(__file__).resolve().parent / "results" / name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Full-size SDXL UNet on one GPU: plain vs DistriUNet, and simulated bands (compute only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on cuda, fp32 on cpu"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a narrow UNet of the same structure (smoke runs)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="= --device cpu --tiny --resolutions 256 --iters 2 --warmup-iters 1",
    )
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=[1024, 2048], help="image pixels (square)"
    )
    parser.add_argument("--bands", type=int, nargs="+", default=[2, 4, 8], help="simulated band counts")
    parser.add_argument("--band-index", choices=["first", "middle", "last"], default="middle")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.CORRECTED_ASYNC_GN.value)
    parser.add_argument("--warmup-steps", type=int, default=4, help="engine warm-up (synchronous) steps")
    parser.add_argument("--warmup-iters", type=int, default=3, help="untimed iterations before timing")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument(
        "--bandwidth",
        action="append",
        metavar="NAME=GBPS",
        help="interconnect bandwidth per direction per GPU, GB/s (repeatable); "
        f"default {', '.join(f'{k}={v:g}' for k, v in INTERCONNECTS_GBPS.items())}",
    )
    parser.add_argument("--collective-latency-us", type=float, default=20.0, help="fixed cost per collective")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="skip the CUDA-graph measurements")
    parser.add_argument("--compile", metavar="BACKEND", help="also measure torch.compile (e.g. inductor)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting new measurements after this"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON path (default: $OUT or benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny, args.resolutions, args.iters, args.warmup_iters = "cpu", True, [256], 2, 1
    return args


def parse_bandwidths(values: list[str] | None) -> dict[str, float]:
    if not values:
        return dict(INTERCONNECTS_GBPS)
    result = {}
    for value in values:
        name, _, gbps = value.partition("=")
        if not gbps:
            raise SystemExit(f"--bandwidth: expected NAME=GBPS, got {value!r}")
        result[name] = float(gbps)
    return result


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --dry-run (or --device cpu --tiny) on a machine without a GPU")
        return 2
    dtype_name = ns.dtype or ("fp16" if ns.device == "cuda" else "fp32")
    device = torch.device("cuda", torch.cuda.current_device()) if ns.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        # Smoke runs only; one thread keeps them from stalling when another process holds a core.
        torch.set_num_threads(1)
    if device.type == "cuda":
        # Same setting for plain and DistriUNet; band shapes get their own autotuning in warm-up.
        torch.backends.cudnn.benchmark = True
    args = Args(
        device=device,
        dtype=DTYPES[dtype_name],
        dtype_name=dtype_name,
        unet_config=TINY_UNET_CONFIG if ns.tiny else SDXL_BASE_UNET_CONFIG,
        resolutions=ns.resolutions,
        bands=ns.bands,
        band_index=ns.band_index,
        mode=ns.mode,
        warmup_steps=ns.warmup_steps,
        warmup_iters=ns.warmup_iters,
        iters=ns.iters,
        bandwidths_gbps=parse_bandwidths(ns.bandwidth),
        collective_latency_us=ns.collective_latency_us,
        seed=ns.seed,
        cuda_graphs=not ns.no_cuda_graphs,
        compile=ns.compile,
        budget_s=ns.budget_s,
        started=time.perf_counter(),
    )
    results = run(args)
    settings = {
        key: value
        for key, value in dataclasses.asdict(args).items()
        if key not in ("device", "dtype", "started", "unet_config")
    }
    report = {
        "benchmark": "gpu_sdxl_unet",
        "machine": machine_info(device),
        "settings": {
            **settings,
            "unet": "tiny (same structure, narrow)"
            if ns.tiny
            else "SDXL base 1.0 UNet config, random weights",
            "unet_config": args.unet_config,
            "unet_batch": 2,
            "baseline": "speedups ('vs fastest plain') and projections are against the faster of plain "
            "diffusers eager and plain diffusers captured as one CUDA graph, at the same resolution",
            "simulation": (
                "bands are SIMULATED in one process: DistriUNet with a topology of n ranks and all-gathers "
                "replaced by a local copy of this rank's data; it measures one band's compute only. "
                "Projection: step = max(band compute, async bytes received / bandwidth + latency * "
                "collectives) + output-gather bytes received / bandwidth + latency."
            ),
        },
        "results": results,
        "total_seconds": time.perf_counter() - args.started,
    }
    text = table(report)
    report["table_markdown"] = text
    path = output_path(ns.output, ns.tiny)
    write_json(path, report)
    print()
    print(text)
    print(f"\nCUDA graphs: {results['cuda_graphs']}")
    if results["skipped"]:
        print(f"skipped: {results['skipped']}")
    print(f"wrote {path} ({report['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
