"""CPU benchmark of DistriFusion patch parallelism on gloo ranks, one thread per rank.

Runs the same seeded denoising loop (SDXL-architecture UNet with random weights, classifier-free
guidance, Euler) at 1, 2 and 4 ranks and reports, per rank count and mode: seconds per UNet step in
the warm-up and in the steady (asynchronous) state, speedup against the 1-rank run of this same
invocation, communication wait, output-gather time, bytes all-gathered per rank (measured by the
engine and counted analytically from the layer shapes), peak RSS per rank, and PSNR of the final
latents and decoded image against the 1-rank output. At 1 rank it also measures the overhead of the
patch machinery against the plain diffusers UNet (same weights, same inputs). For the speedup target
it also alternates 1-rank and N-rank steps round by round in one process group (--rounds), so that a
change in the machine's speed during the run does not land on one side only.

    python benchmarks/cpu_patch_parallel.py [--quick] [--output benchmarks/results/cpu_patch_parallel.json]

Each rank is limited to one intra-op thread (the 1-rank baseline too), so N ranks use N cores; on a
machine with fewer cores than ranks the run is oversubscribed and is flagged as such.

On a shared machine other processes' work would land in the timings: before each phase the script
waits for idle CPUs (--wait-idle), measures the CPU other processes used during every measurement, and
re-runs a measurement they disturbed (--retries); --resume keeps undisturbed phases across an
interrupted run. That machinery, the timing loops and the paired statistics are benchmarks/harness.py's;
this script holds its configurations, what it measures per step, and its tables. It writes the JSON
only: the BENCHMARKS.md section "CPU: patch parallelism on gloo ranks" is written by hand from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from torch import nn

from benchmarks.analytic_bytes import ANALYTIC_FORMULA, analytic_bytes, band_rows, layer_shapes
from benchmarks.band_simulation import endless_generation, simulate, simulated_band_unet
from benchmarks.harness import (
    FOREIGN_LIMIT,
    MIB,
    ForeignCpu,
    Phases,
    Profile,
    abba,
    all_ranks,
    checkpoint_folder,
    compare_profiles,
    disturbed,
    log,
    machine_info,
    machine_line,
    paired_ratios,
    peak_rss_bytes,
    profile_ops,
    release_memory,
    reset_peak_rss,
    slowest_median,
    step_seconds,
    write_json,
)
from distrifusion.config import DistriConfig, Mode
from distrifusion.launch import spawn_local
from distrifusion.serving.cpu_server import status_bytes
from distrifusion.tiny_model import build_tiny_sdxl
from distrifusion.topology import Topology
from distrifusion.unet import DistriUNet, GenerationInfo

PROMPT = "a photo of an astronaut riding a horse on the moon"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cpu_patch_parallel.json"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on; picklable so the spawned ranks get it."""

    seed: int
    block_out_channels: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    latent_size: int
    steps: int
    warmup_steps: int
    guidance_scale: float
    comm_batch_size: int
    overhead_pairs: int
    profile: bool
    worlds: tuple[int, ...]
    modes_by_world: dict[int, tuple[str, ...]]

    @property
    def image_size(self) -> int:
        return self.latent_size * 8

    @property
    def profiled_step(self) -> int | None:
        """A steady step profiled on rank 0 (and left out of every steady-state figure)."""
        return self.steps - 2 if self.profile else None

    def steady_steps(self) -> list[int]:
        """Asynchronous steps without the first one (it records the batches and allocates their
        buffers), the last one (it sends nothing: nobody would read it) and the profiled one."""
        first_async = self.warmup_steps + 1
        return [s for s in range(first_async + 1, self.steps - 1) if s != self.profiled_step]

    def warmup_step_indices(self) -> list[int]:
        # Step 0 also computes the text keys/values that later steps reuse; report it but keep it
        # out of the warm-up median.
        return list(range(1, min(self.warmup_steps + 1, self.steps)))


# --------------------------------------------------------------------------------------------------
# Model and inputs


def build_pipe(settings: Settings) -> StableDiffusionXLPipeline:
    return build_tiny_sdxl(
        settings.seed,
        block_out_channels=settings.block_out_channels,
        transformer_layers_per_block=settings.transformer_layers_per_block,
    )


@dataclasses.dataclass
class Inputs:
    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor]
    latents: torch.Tensor


def make_inputs(pipe: StableDiffusionXLPipeline, settings: Settings) -> Inputs:
    """CFG conditioning (unconditional half first, as diffusers does) and the seeded initial noise."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True
        )
    size = settings.image_size
    # SDXL micro-conditioning: original size, crop top-left, target size.
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(2, 1)
    latents = torch.randn(
        (1, 4, settings.latent_size, settings.latent_size),
        generator=torch.Generator("cpu").manual_seed(settings.seed),
    )
    return Inputs(
        prompt_embeds=torch.cat([negative, embeds]),
        added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids},
        latents=latents,
    )


def make_scheduler(pipe: StableDiffusionXLPipeline, steps: int) -> EulerDiscreteScheduler:
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclasses.dataclass
class StepRecord:
    seconds: float
    cpu_seconds: float
    """CPU time of the whole rank process (every thread, gloo's too) during the step: unlike the wall
    time it hardly moves when another process takes turns on the same cores."""
    wait_seconds: float
    gather_seconds: float
    bytes_sent: int
    bytes_received: int
    collectives: int


def denoise(
    pipe: StableDiffusionXLPipeline,
    unet: nn.Module,
    inputs: Inputs,
    settings: Settings,
    profile_rank0: bool,
) -> tuple[torch.Tensor, list[StepRecord], Profile | None]:
    """The SDXL denoising loop (CFG, Euler) with every UNet call timed; returns the final latents."""
    scheduler = make_scheduler(pipe, settings.steps)
    latents = inputs.latents * scheduler.init_noise_sigma
    distri = unet if isinstance(unet, DistriUNet) else None
    if distri is not None:
        distri.begin_generation(
            GenerationInfo(do_classifier_free_guidance=True, num_timesteps=settings.steps)
        )
    records: list[StepRecord] = []
    profile: Profile | None = None
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)

        def call(model_input: torch.Tensor = model_input, timestep: torch.Tensor = timestep) -> torch.Tensor:
            return unet(
                model_input,
                timestep,
                encoder_hidden_states=inputs.prompt_embeds,
                added_cond_kwargs=inputs.added_cond_kwargs,
                return_dict=False,
            )[0]

        with torch.no_grad():
            started, cpu_started = time.perf_counter(), time.process_time()
            if index == settings.profiled_step and profile_rank0:
                noise, profile = profile_ops(call)
            else:
                noise = call()
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if distri is not None:
            # The engine's own account of this step's communication. The output gather is a
            # blocking collective at the end of every step, where a rank waits for the slowest
            # one, so it gets its own figure (it is part of wait_seconds too).
            stats = distri.steps[-1].communication
            records.append(
                StepRecord(
                    seconds,
                    cpu_seconds,
                    stats.wait_seconds,
                    stats.output_gather_seconds,
                    stats.bytes_sent,
                    stats.bytes_received,
                    stats.collectives,
                )
            )
        else:
            records.append(StepRecord(seconds, cpu_seconds, 0.0, 0.0, 0, 0, 0))
        uncond, cond = noise.chunk(2)
        noise = uncond + settings.guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, timestep, latents, return_dict=False)[0]
    return latents, records, profile


def decode_uint8(pipe: StableDiffusionXLPipeline, latents: torch.Tensor) -> np.ndarray:
    """The VAE's image as 8-bit RGB, as a pipeline would save it."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------------
# What the ranks run


def _rank_summary(records: list[StepRecord], peak: int, rss_before: int) -> dict[str, Any]:
    return {
        "step_seconds": [r.seconds for r in records],
        "cpu_seconds": [r.cpu_seconds for r in records],
        "wait_seconds": [r.wait_seconds for r in records],
        "gather_seconds": [r.gather_seconds for r in records],
        "bytes_sent": [r.bytes_sent for r in records],
        "bytes_received": [r.bytes_received for r in records],
        "collectives": [r.collectives for r in records],
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss_before,
    }


def generate(
    settings: Settings, config: DistriConfig, world: int, profile_here: bool
) -> dict[str, Any] | None:
    """One measured generation on every rank of the group; rank 0 returns every rank's per-step
    records, the latents, the decoded image and its profile (the other ranks None)."""
    release_memory()
    pipe = build_pipe(settings)
    inputs = make_inputs(pipe, settings)
    unet = DistriUNet(pipe.unet, config)
    release_memory()
    rss_before = status_bytes(os.getpid(), "VmRSS") or 0
    peak_supported = reset_peak_rss()
    meter = ForeignCpu(world=world).start()
    latents, records, profile = denoise(pipe, unet, inputs, settings, profile_here)
    window = meter.stop()
    summary = _rank_summary(records, peak_rss_bytes(), rss_before)
    summary["peak_rss_is_per_run"] = peak_supported
    per_rank = all_ranks(summary)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {
        "ranks": per_rank,
        "latents": latents.numpy(),
        "image": decode_uint8(pipe, latents),
        "profile": profile,
        "foreign_cpu": window,
    }


def run_single_generation(settings: Settings) -> dict[str, Any] | None:
    """The 1-rank reference generation (the speedup baseline and the PSNR reference), with profile."""
    torch.set_num_threads(1)
    config = DistriConfig(mode=Mode.CORRECTED_ASYNC_GN, device="cpu")
    return generate(settings, config, world=1, profile_here=settings.profile)


def run_world(settings: Settings, world: int, modes: tuple[str, ...]) -> dict[str, Any]:
    """``modes`` at this world size; runs on every rank, rank 0's result counts."""
    torch.set_num_threads(1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    results: dict[str, Any] = {}
    for mode in modes:
        config = DistriConfig(
            mode=mode,
            warmup_steps=settings.warmup_steps,
            comm_batch_size=settings.comm_batch_size,
            dtype="fp32",
            device="cpu",
        )
        result = generate(settings, config, world, profile_here=rank == 0 and mode == Mode.CORRECTED_ASYNC_GN)
        if result is not None:
            results[mode] = result
    return results


def steady_input(
    pipe: StableDiffusionXLPipeline, inputs: Inputs, settings: Settings
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One mid-schedule timestep's UNet input (batch 2, CFG), the timestep and the conditioning."""
    scheduler = make_scheduler(pipe, settings.steps)
    timestep = scheduler.timesteps[settings.steps // 2]
    model_input = scheduler.scale_model_input(torch.cat([inputs.latents * scheduler.sigmas[0]] * 2), timestep)
    kwargs = {"encoder_hidden_states": inputs.prompt_embeds, "added_cond_kwargs": inputs.added_cond_kwargs}
    return model_input, timestep, kwargs


def run_paired_speedup(settings: Settings, mode: str, rounds: int, block: int) -> dict[str, Any]:
    """The speedup of this process group's ranks over 1 rank, measured in rounds so that a drifting
    machine cancels out.

    The sequential figures above time the 1-rank run and each multi-rank run minutes apart, and this
    machine's speed moves by several percent in that time. Here, in one process group, rank 0 alone
    runs ``block`` steps of the engine at 1 band (the others wait in a barrier, their cores idle, as in
    the 1-rank run), then every rank runs ``block`` steady steps of ``mode``; each round (ABBA order)
    gives one ratio of medians. Steps repeat one mid-schedule timestep, in the steady state.
    """
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    pipe = build_pipe(settings)
    inputs = make_inputs(pipe, settings)
    config = DistriConfig(
        mode=mode, warmup_steps=settings.warmup_steps, comm_batch_size=settings.comm_batch_size, device="cpu"
    )
    parallel = DistriUNet(pipe.unet, config)
    # Rank 0 alone, inside the group: a topology of one rank (it never communicates).
    single = DistriUNet(build_pipe(settings).unet, config, topology=Topology())
    model_input, timestep, kwargs = steady_input(pipe, inputs, settings)

    def run_block(unet: DistriUNet) -> list[float]:
        return step_seconds(lambda: unet(model_input, timestep, **kwargs, return_dict=False), block)

    def single_block() -> float:
        return statistics.median(all_ranks(run_block(single) if rank == 0 else [])[0])

    def parallel_block() -> float:
        return statistics.median([max(step) for step in zip(*all_ranks(run_block(parallel)), strict=True)])

    with torch.no_grad():
        generation = endless_generation()
        parallel.begin_generation(generation)
        single.begin_generation(generation)
        for _ in range(settings.warmup_steps + 2):  # synchronous steps, then the recording step
            parallel(model_input, timestep, **kwargs, return_dict=False)
        single_block()
        meter = ForeignCpu(world=world).start()
        pairs = abba(rounds, single_block, parallel_block)
        window = meter.stop()
    single_medians, parallel_medians = [one for one, _ in pairs], [many for _, many in pairs]
    paired = paired_ratios(single_medians, parallel_medians)
    return {
        "mode": mode,
        "world": world,
        "rounds": rounds,
        "steps_per_block": block,
        "single_step_seconds": single_medians,
        "parallel_step_seconds": parallel_medians,
        "ratios": paired["ratios"],
        "median_ratio": paired["median_ratio"],
        "foreign_cpu": window,
    }


def run_plain_concurrent(settings: Settings, threads: int, repeats: int) -> dict[str, Any]:
    """Every rank runs the plain, full-size UNet on its own, at the same time, no communication.

    With 1 thread per rank this measures how much concurrent processes slow each other down on this
    machine (shared caches, memory bandwidth, SMT siblings, oversubscription); at 1 rank with 2 threads
    it is what the second core buys a single process through intra-op parallelism instead. (It runs in
    a fresh process: changing a process's thread count back and forth was seen to slow it ~10x.)
    """
    torch.set_num_threads(threads)
    world = dist.get_world_size() if dist.is_initialized() else 1
    pipe = build_pipe(settings)
    inputs = make_inputs(pipe, settings)
    unet = pipe.unet
    model_input = torch.cat([inputs.latents] * 2)
    kwargs = {"encoder_hidden_states": inputs.prompt_embeds, "added_cond_kwargs": inputs.added_cond_kwargs}
    with torch.no_grad():
        unet(model_input, 500, **kwargs, return_dict=False)
        meter = ForeignCpu(world=world).start()
        times = step_seconds(
            lambda: unet(model_input, 500, **kwargs, return_dict=False),
            repeats,
            before=dist.barrier if world > 1 else None,  # start together, so the steps really overlap
        )
        window = meter.stop()
    return {
        "ranks": world,
        "threads_per_rank": threads,
        "step_seconds_per_rank": all_ranks(times),
        "foreign_cpu": window,
    }


def run_single_overhead(settings: Settings) -> dict[str, Any]:
    """At 1 rank: DistriUNet vs the plain diffusers UNet, the plain band-shaped UNet, the engine's
    band without communication (simulated), and the layer shapes for the analytic byte count."""
    torch.set_num_threads(1)
    pipe = build_pipe(settings)
    inputs = make_inputs(pipe, settings)
    unet = DistriUNet(pipe.unet, DistriConfig(mode=Mode.CORRECTED_ASYNC_GN, device="cpu"))
    # The plain diffusers UNet with the same weights: the builder is deterministic per seed.
    plain = build_pipe(settings).unet
    model_input, timestep, kwargs = steady_input(pipe, inputs, settings)
    unet.begin_generation(endless_generation())
    layers, handles = layer_shapes(plain)
    repeats = settings.overhead_pairs // 2 + 1
    with torch.no_grad():
        plain_out = plain(model_input, timestep, **kwargs, return_dict=False)[0]  # warm-up + shapes
        for handle in handles:
            handle.remove()
        unet(model_input, timestep, **kwargs, return_dict=False)  # warm-up (step 0)
        distri_out = unet(model_input, timestep, **kwargs, return_dict=False)[0]  # cached text K/V path
        max_abs_diff = (plain_out - distri_out).abs().max().item()
        meter = ForeignCpu().start()
        pairs = abba(
            settings.overhead_pairs,
            lambda: step_seconds(lambda: plain(model_input, timestep, **kwargs, return_dict=False), 1)[0],
            lambda: step_seconds(lambda: unet(model_input, timestep, **kwargs, return_dict=False), 1)[0],
        )

        # The compute a band would cost with no patch machinery and no communication at all: the
        # plain UNet on a latent as tall as the tallest band. Its ratio to the full latent's step
        # is the best speedup N ranks can reach on this model, whatever the engine does.
        band_times: dict[int, list[float]] = {}
        for world in settings.worlds:
            if world == 1:
                continue
            rows = band_rows(settings.latent_size, levels=len(settings.block_out_channels), bands=world)
            band_input = model_input[:, :, :rows].contiguous()
            plain(band_input, timestep, **kwargs, return_dict=False)
            band_times[world] = step_seconds(
                lambda band_input=band_input: plain(band_input, timestep, **kwargs, return_dict=False),
                repeats,
            )

        # The engine's own band, without communication: a DistriUNet that computes band r of n in
        # this process, its all-gathers replaced by local copies (band_simulation.py). Against the
        # plain band above it prices the patch machinery; against the real n-rank step, the
        # communication and the contention of n processes.
        simulated_times: dict[int, list[float]] = {}
        simulated = simulated_band_unet(
            build_pipe(settings).unet,
            DistriConfig(mode=Mode.CORRECTED_ASYNC_GN, warmup_steps=settings.warmup_steps, device="cpu"),
        )
        for world in settings.worlds:
            if world == 1:
                continue
            simulate(simulated, world, world // 2)
            simulated.begin_generation(endless_generation())
            for _ in range(settings.warmup_steps + 2):  # synchronous steps, then the recording step
                simulated(model_input, timestep, **kwargs, return_dict=False)
            simulated_times[world] = step_seconds(
                lambda: simulated(model_input, timestep, **kwargs, return_dict=False), repeats
            )
        overhead_window = meter.stop()

    return {
        "overhead": {
            "plain_step_seconds": [p for p, _ in pairs],
            "distri_step_seconds": [d for _, d in pairs],
            "max_abs_diff_plain_vs_distri": max_abs_diff,
            "plain_band_step_seconds": band_times,
            "simulated_engine_band_step_seconds": simulated_times,
        },
        "layers": layers,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "foreign_cpu": overhead_window,
    }


# --------------------------------------------------------------------------------------------------
# Analysis (parent process)


def psnr(reference: np.ndarray, other: np.ndarray, peak: float) -> float:
    mse = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def summarize(
    run: dict[str, Any], settings: Settings, world: int, reference: dict[str, Any] | None
) -> dict[str, Any]:
    """Per-configuration figures from every rank's per-step records."""
    steady = settings.steady_steps()
    warm = settings.warmup_step_indices()
    ranks = run["ranks"]

    def per_rank_median(field: str, steps: list[int]) -> list[float]:
        return [statistics.median(r[field][s] for s in steps) for r in ranks] if steps else []

    # Ranks meet at the output gather every step, so a step lasts as long on every rank; the
    # slowest rank's figure is the latency.
    steady_step = max(per_rank_median("step_seconds", steady), default=None)
    warm_step = max(per_rank_median("step_seconds", warm), default=None)
    summary: dict[str, Any] = {
        "ranks": world,
        "oversubscribed": world > (os.cpu_count() or 1),
        "steady_step_seconds": steady_step,
        "warmup_step_seconds": warm_step,
        "first_step_seconds": max(r["step_seconds"][0] for r in ranks),
        "steady_step_seconds_min": max(
            (min(r["step_seconds"][s] for s in steady) for r in ranks), default=None
        ),
        "steady_cpu_seconds_per_rank": per_rank_median("cpu_seconds", steady),
        "steady_wait_seconds_per_rank": per_rank_median("wait_seconds", steady),
        "steady_gather_seconds_per_rank": per_rank_median("gather_seconds", steady),
        "warmup_wait_seconds_per_rank": per_rank_median("wait_seconds", warm),
        "steady_bytes_sent_per_rank": per_rank_median("bytes_sent", steady),
        "steady_bytes_received_per_rank": per_rank_median("bytes_received", steady),
        "warmup_bytes_sent_per_rank": per_rank_median("bytes_sent", warm),
        "steady_collectives_per_rank": per_rank_median("collectives", steady),
        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
        "rss_before_generation_bytes_per_rank": [r["rss_before_bytes"] for r in ranks],
        "peak_rss_is_per_run": all(r.get("peak_rss_is_per_run", False) for r in ranks),
        "per_step": ranks,
    }
    if reference is not None:
        summary["psnr_latents_db"] = psnr(
            reference["latents"], run["latents"], float(np.ptp(reference["latents"]))
        )
        summary["psnr_image_db"] = psnr(reference["image"], run["image"], 255.0)
        summary["latents_max_abs_diff"] = float(np.abs(reference["latents"] - run["latents"]).max())
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def markdown_table(configs: list[dict[str, Any]]) -> str:
    header = (
        "| ranks | mode | warm-up s/step | steady s/step | speedup vs 1 rank | CPU s/step/rank | "
        "engine comm wait s/step | "
        "output gather s/step | sent MiB/step/rank (measured / analytic) | peak RSS MiB/rank | "
        "PSNR latents dB | PSNR image dB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in configs:
        ranks = f"{c['ranks']}" + (" (oversubscribed)" if c["oversubscribed"] else "")
        if disturbed(c.get("foreign_cpu", {})):
            ranks += (
                f" (disturbed: other processes {100 * c['foreign_cpu']['foreign_cpu_fraction']:.0f} % CPU)"
            )
        waits = c["steady_wait_seconds_per_rank"]
        cpu = c["steady_cpu_seconds_per_rank"]
        gathers = c["steady_gather_seconds_per_rank"]
        sent = c["steady_bytes_sent_per_rank"]
        measured = max(sent) / MIB if sent else None
        analytic = c["analytic"]["total_bytes"] / MIB
        lines.append(
            f"| {ranks} | {c['mode']} | {_fmt(c['warmup_step_seconds'])} | {_fmt(c['steady_step_seconds'])} | "
            f"{_fmt(c.get('speedup_vs_1_rank'), 2)} | {_fmt(max(cpu) if cpu else None)} | "
            f"{_fmt(max(waits) if waits else None)} | "
            f"{_fmt(max(gathers) if gathers else None)} | {_fmt(measured, 2)} / {_fmt(analytic, 2)} | "
            f"{max(c['peak_rss_bytes_per_rank']) / MIB:.0f} | {_fmt(c.get('psnr_latents_db'), 1)} | "
            f"{_fmt(c.get('psnr_image_db'), 1)} |"
        )
    return "\n".join(lines)


def speedup_ceilings(
    settings: Settings, overhead: dict[str, Any], concurrency: dict[str, Any], configs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What limits the speedup before the engine does anything: the band's compute and contention.

    band-only ceiling = plain full step / plain band step (work that does not shrink with the band:
    time embedding, per-layer Python and dispatch costs, small-tensor inefficiency); contention =
    plain full step with N concurrent processes / alone. Their product bounds what N ranks can reach.
    """
    plain = overhead["plain_step_seconds_median"]
    rows = []
    for world in settings.worlds:
        if world == 1:
            continue
        band = overhead["plain_band_step_seconds_median"][world]
        engine_band = overhead["simulated_engine_band_step_seconds_median"][world]
        concurrent = slowest_median(concurrency[f"{world}x1_thread"]["step_seconds_per_rank"])
        contention = concurrent / plain
        measured = {c["mode"]: c["speedup_vs_1_rank"] for c in configs if c["ranks"] == world}
        rows.append(
            {
                "ranks": world,
                "plain_full_step_alone_seconds": plain,
                "plain_full_step_concurrent_seconds": concurrent,
                "contention_factor": contention,
                "plain_band_step_seconds": band,
                "band_only_ceiling": plain / band,
                "ceiling_with_contention": plain / (band * contention),
                "engine_band_no_comm_seconds": engine_band,
                "engine_band_ceiling_with_contention": plain / (engine_band * contention),
                "measured_speedup_by_mode": measured,
            }
        )
    return rows


def ceilings_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| ranks | plain full step alone s | same, N processes at once s | contention | plain band step s | "
        "ceiling (band only) | ceiling (band x contention) | engine band, no comm s (simulated) | "
        "ceiling (engine band x contention) | measured corrected_async_gn | measured naive_patch |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        measured = r["measured_speedup_by_mode"]
        lines.append(
            f"| {r['ranks']} | {r['plain_full_step_alone_seconds']:.3f} | "
            f"{r['plain_full_step_concurrent_seconds']:.3f} | {r['contention_factor']:.2f} | "
            f"{r['plain_band_step_seconds']:.3f} | {r['band_only_ceiling']:.2f} | "
            f"{r['ceiling_with_contention']:.2f} | {r['engine_band_no_comm_seconds']:.3f} | "
            f"{r['engine_band_ceiling_with_contention']:.2f} | {_fmt(measured.get('corrected_async_gn'), 2)} | "
            f"{_fmt(measured.get('naive_patch'), 2)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main


ALL_MODES = tuple(m.value for m in Mode)


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        defaults = {"latent": 32, "steps": 9, "pairs": 2, "profile": False}
        modes_by_world = {
            1: (Mode.CORRECTED_ASYNC_GN.value,),
            2: ("corrected_async_gn", "naive_patch"),
            4: ("corrected_async_gn",),
        }
    else:
        defaults = {"latent": 64, "steps": 14, "pairs": 6, "profile": True}
        modes_by_world = {1: (Mode.CORRECTED_ASYNC_GN.value,), 2: ALL_MODES, 4: ALL_MODES}
    if args.modes:
        modes_by_world = {
            w: (Mode.CORRECTED_ASYNC_GN.value,) if w == 1 else tuple(args.modes) for w in modes_by_world
        }
    return Settings(
        seed=args.seed,
        block_out_channels=tuple(args.block_out_channels),
        transformer_layers_per_block=tuple(args.transformer_layers),
        latent_size=args.latent or defaults["latent"],
        steps=args.steps or defaults["steps"],
        warmup_steps=args.warmup_steps,
        guidance_scale=5.0,
        comm_batch_size=args.comm_batch_size,
        overhead_pairs=args.overhead_pairs or defaults["pairs"],
        profile=defaults["profile"] and not args.no_profile,
        worlds=tuple(sorted(set(args.ranks))),
        modes_by_world={w: modes_by_world.get(w, ALL_MODES) for w in args.ranks},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="256x256 image, 9 steps, fewer modes (about a minute)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts (1 is always run)"
    )
    parser.add_argument("--modes", nargs="+", choices=ALL_MODES, help="modes for >1 rank (default: all)")
    parser.add_argument(
        "--latent", type=int, help="latent height = width (image pixels / 8); default 64, quick 32"
    )
    parser.add_argument("--steps", type=int, help="denoising steps; default 14, quick 9")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--comm-batch-size", type=int, default=60)
    parser.add_argument("--overhead-pairs", type=int, help="plain/DistriUNet step pairs at 1 rank")
    parser.add_argument("--block-out-channels", type=int, nargs=3, default=[128, 256, 512])
    parser.add_argument("--transformer-layers", type=int, nargs=3, default=[1, 1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    parser.add_argument(
        "--rounds", type=int, default=6, help="paired 1-rank/N-rank rounds for the speedup target (0: skip)"
    )
    parser.add_argument("--steps-per-round", type=int, default=3, help="steps of each side in a paired round")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=180.0,
        help="before each phase wait up to this many seconds for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep undisturbed measurements in a temporary folder and reuse them (same settings) when "
        "an interrupted run is started again",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"re-run a measurement during which other processes used > {100 * FOREIGN_LIMIT:.0f} %% of the CPUs",
    )
    args = parser.parse_args(argv)
    if 1 not in args.ranks:
        args.ranks = [1, *args.ranks]
    return args


def measure_worlds(
    phases: Phases, settings: Settings, single: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every configuration's figures (the 1-rank reference first) and the profile comparisons."""
    layers = single["layers"]
    levels = len(settings.block_out_channels)
    base = summarize(single, settings, 1, None)
    base["mode"] = "(1 rank)"
    base["foreign_cpu"] = single["foreign_cpu"]
    base["analytic"] = analytic_bytes(layers, settings.latent_size, settings.latent_size, levels, 1, "")
    base["speedup_vs_1_rank"] = 1.0
    configs = [base]
    profiles: dict[str, Any] = {}
    for world in settings.worlds:
        if world == 1:
            continue
        flag = " -- OVERSUBSCRIBED: more ranks than cores" if world > (os.cpu_count() or 1) else ""
        # One process group per mode: short measurements fit the quiet spells of a shared machine,
        # and a disturbed one is retried alone.
        runs = {
            mode: phases.run_clean(
                f"{world} ranks, {mode}{flag}",
                lambda world=world, mode=mode: spawn_local(
                    run_world, world, (settings, world, (mode,)), threads_per_rank=1
                )[mode],
            )
            for mode in settings.modes_by_world[world]
        }
        for mode, run in runs.items():
            config = summarize(run, settings, world, single)
            config["mode"] = mode
            config["foreign_cpu"] = run["foreign_cpu"]
            config["attempts"] = run["attempts"]
            config["analytic"] = analytic_bytes(
                layers, settings.latent_size, settings.latent_size, levels, world, mode
            )
            config["speedup_vs_1_rank"] = base["steady_step_seconds"] / config["steady_step_seconds"]
            config["cpu_time_speedup_vs_1_rank"] = max(base["steady_cpu_seconds_per_rank"]) / max(
                config["steady_cpu_seconds_per_rank"]
            )
            configs.append(config)
            log(
                f"   {mode}: steady {config['steady_step_seconds']:.3f} s/step, "
                f"speedup {config['speedup_vs_1_rank']:.2f}x, PSNR latents {config['psnr_latents_db']:.1f} dB"
            )
            if run["profile"] and single["profile"]:
                profiles[f"{world}_ranks_{mode}"] = compare_profiles(single["profile"], run["profile"], world)
    return configs, profiles


def measure_paired(phases: Phases, settings: Settings, rounds: int, steps_per_round: int) -> dict[str, Any]:
    """The paired speedup of corrected_async_gn at every rank count that fits the cores."""
    paired: dict[str, Any] = {}
    mode = Mode.CORRECTED_ASYNC_GN.value
    for world in settings.worlds:
        if not (1 < world <= (os.cpu_count() or 1) and mode in settings.modes_by_world[world] and rounds):
            continue
        paired[f"{world}_ranks_{mode}"] = result = phases.run_clean(
            f"{world} ranks, {mode}, paired round by round with 1 rank",
            lambda world=world: spawn_local(
                run_paired_speedup, world, (settings, mode, rounds, steps_per_round), threads_per_rank=1
            ),
        )
        log(
            f"   paired speedup: median {result['median_ratio']:.2f}x over {rounds} rounds "
            f"(each {min(result['ratios']):.2f}x to {max(result['ratios']):.2f}x)"
        )
    return paired


def summarize_overhead(overhead: dict[str, Any]) -> dict[str, Any]:
    """The 1-rank overhead of DistriUNet over the plain UNet, and the band steps' medians."""
    plain, distri = overhead["plain_step_seconds"], overhead["distri_step_seconds"]
    paired = paired_ratios(distri, plain)
    return {
        "plain_step_seconds_median": statistics.median(plain),
        "distri_1_rank_step_seconds_median": statistics.median(distri),
        "overhead_fraction": paired["ratio_of_medians"] - 1,
        "pair_ratios": paired["ratios"],
        "max_abs_diff_plain_vs_distri": overhead["max_abs_diff_plain_vs_distri"],
        "plain_band_step_seconds_median": {
            world: statistics.median(times) for world, times in overhead["plain_band_step_seconds"].items()
        },
        "simulated_engine_band_step_seconds_median": {
            world: statistics.median(times)
            for world, times in overhead["simulated_engine_band_step_seconds"].items()
        },
        "raw": overhead,
    }


def targets(
    configs: list[dict[str, Any]], paired: dict[str, Any], overhead: dict[str, Any]
) -> dict[str, Any]:
    """The project's targets: 1.8x at 2 ranks (sequential and paired), <= 3 % overhead at 1 rank."""
    corrected_2 = next((c for c in configs if c["ranks"] == 2 and c["mode"] == Mode.CORRECTED_ASYNC_GN), None)
    paired_2 = paired.get(f"2_ranks_{Mode.CORRECTED_ASYNC_GN.value}")
    return {
        "speedup_2_ranks_corrected_async_gn": {
            "target": ">= 1.8",
            "measured": corrected_2["speedup_vs_1_rank"] if corrected_2 else None,
            "met": bool(corrected_2 and corrected_2["speedup_vs_1_rank"] >= 1.8),
        },
        "speedup_2_ranks_corrected_async_gn_paired": {
            "target": ">= 1.8 (median of the paired rounds)",
            "measured": paired_2["median_ratio"] if paired_2 else None,
            "met": bool(paired_2 and paired_2["median_ratio"] >= 1.8),
        },
        "overhead_1_rank_vs_plain": {
            "target": "<= 3%",
            "measured": overhead["overhead_fraction"],
            "met": overhead["overhead_fraction"] <= 0.03,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    if settings.steps < settings.warmup_steps + 4:
        print("need at least warmup_steps + 4 steps for a steady-state figure", file=sys.stderr)
        return 2
    checkpoints = None
    if args.resume:
        checkpoints = checkpoint_folder("cpu_patch_parallel", dataclasses.asdict(settings))
        log(f"checkpoints: {checkpoints}")
    phases = Phases(idle_wait=args.wait_idle, retries=args.retries, checkpoints=checkpoints)
    machine = machine_info()
    log(f"machine: {machine_line(machine)}; {machine['usable_cpus']} usable CPUs, torch {machine['torch']}")
    log(
        f"UNet block_out_channels={settings.block_out_channels} layers={settings.transformer_layers_per_block}, "
        f"{settings.image_size}x{settings.image_size} image ({settings.latent_size}^2 latent), batch 1 + CFG "
        f"(UNet batch 2), {settings.steps} Euler steps, warm-up steps 0..{settings.warmup_steps}, "
        f"steady steps {settings.steady_steps()}"
    )
    started = time.perf_counter()
    single = phases.run_clean(
        "1 rank: reference generation",
        lambda: spawn_local(run_single_generation, 1, (settings,), threads_per_rank=1),
    )
    single.update(
        phases.run_clean(
            "1 rank: DistriUNet vs plain diffusers UNet, plain band, simulated engine band",
            lambda: spawn_local(run_single_overhead, 1, (settings,), threads_per_rank=1),
        )
    )
    repeats = 2 if args.quick else 3
    concurrency = {
        "1x2_threads": phases.run_clean(
            "plain UNet, 1 process with 2 threads",
            lambda: spawn_local(run_plain_concurrent, 1, (settings, 2, repeats)),
        )
    }
    for world in settings.worlds:
        if world > 1:
            concurrency[f"{world}x1_thread"] = phases.run_clean(
                f"plain UNet, {world} concurrent 1-thread processes (no communication)",
                lambda world=world: spawn_local(
                    run_plain_concurrent, world, (settings, 1, repeats), threads_per_rank=1
                ),
            )
    configs, profiles = measure_worlds(phases, settings, single)
    paired = measure_paired(phases, settings, args.rounds, args.steps_per_round)

    overhead = summarize_overhead(single["overhead"])
    ceilings = speedup_ceilings(settings, overhead, concurrency, configs)
    goals = targets(configs, paired, overhead)
    table = markdown_table(configs)
    report = {
        "benchmark": "cpu_patch_parallel",
        "machine": machine,
        "settings": {
            **dataclasses.asdict(settings),
            "image_size": settings.image_size,
            "unet_parameters": single["parameters"],
            "unet_batch": 2,
            "dtype": "fp32",
            "threads_per_rank": 1,
            "scheduler": "EulerDiscreteScheduler (SDXL config)",
            "prompt": PROMPT,
            "steady_steps": settings.steady_steps(),
            "warmup_step_indices_timed": settings.warmup_step_indices(),
            "profiled_step": settings.profiled_step,
            "psnr": "latents: peak = value range (max - min) of the 1-rank latents; image: 8-bit RGB, peak 255. "
            "The weights are random, so the decoded image is not a picture; its PSNR still measures how far "
            "the VAE output moves.",
        },
        "analytic_formula": ANALYTIC_FORMULA,
        "targets": goals,
        "overhead_1_rank": overhead,
        "configurations": configs,
        "speedup_ceilings": ceilings,
        "paired_speedup": paired,
        "plain_concurrency": concurrency,
        "profile_excess_ops": profiles,
        "phases": phases.records,
        "total_seconds": time.perf_counter() - started,
        "table_markdown": table,
    }
    write_json(args.output, report)
    print()
    print(table)
    print()
    print(
        f"overhead at 1 rank: plain {overhead['plain_step_seconds_median']:.3f} s/step, DistriUNet "
        f"{overhead['distri_1_rank_step_seconds_median']:.3f} s/step "
        f"({100 * overhead['overhead_fraction']:+.1f} %; target <= 3 %), max |diff| "
        f"{overhead['max_abs_diff_plain_vs_distri']:.2e}; plain UNet in one process with 2 threads: "
        f"{slowest_median(concurrency['1x2_threads']['step_seconds_per_rank']):.3f} s/step"
    )
    print()
    print(ceilings_table(ceilings))
    for name, target in goals.items():
        print(f"target {name}: {target['target']}, measured {target['measured']}, met: {target['met']}")
    for name, rows in profiles.items():
        print(f"\nprofiled steady step, {name}: ops whose time exceeds 1/ranks of the 1-rank step most")
        for row in rows[:10]:
            print("  ", row)
    print(f"\nanalytic count: {ANALYTIC_FORMULA}")
    print(f"wrote {args.output} ({report['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
