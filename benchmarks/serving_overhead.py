"""Serving overhead: the same request end to end through the `sdxl` ensemble on the CPU tritonserver
versus in-process with the engine (DistriPipeline, same configuration), same machine, same run.

    python benchmarks/serving_overhead.py [--size 512] [--steps 12] [--repetitions 5] [--rounds 2]

Engine: 2 gloo ranks via distrifusion.launch.spawn_local (1 thread each, as the served UNet),
corrected_async_gn, warmup_steps 4, fp32, the shipped demo model (demo_model/sdxl-shapes); text encoders, UNet and
VAE in PyTorch; timed around the pipeline call on rank 0 (the model loaded, one untimed call first).
Served: the CPU repository built from the same model (UNet the same engine on 2 gloo ranks; text
encoders and VAE exported to ONNX, run by ONNX Runtime); timed around the gRPC call at the client
(one untimed call first). Engine and server blocks alternate for --rounds rounds (the server idles
while the engine runs). Reports medians, the ratio served / in-process, and where the time goes:
per-model compute and queue time from Triton's statistics API, and per-stage time in the engine.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import tritonclient.grpc as grpcclient

from benchmarks.harness import log, machine_line, start_conditions, wait_idle, write_json
from benchmarks.serving_common import BENCHMARKS_MD, SERVING_RESULTS, update_benchmarks_section
from clients.sdxl_client import generate
from demo_model import SHIPPED
from distrifusion.config import DistriConfig
from distrifusion.launch import spawn_local
from distrifusion.pipeline import DistriPipeline
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

MODEL_DIR = SHIPPED
PROMPT = "a lighthouse on a cliff at dawn, watercolor"
NEGATIVE = "blurry"
TARGET = 1.10
ENCODER_AND_VAE_MODELS = ("tokenizer", "text_encoder", "text_encoder_2", "vae_decoder")


def _timed(record: dict[str, list[float]], name: str, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record.setdefault(name, []).append(time.perf_counter() - started)

    return wrapper


def engine_timings(model_dir: str, call: dict[str, Any], repetitions: int) -> dict[str, Any]:
    """Runs on every rank of a spawn_local group: one untimed call, then ``repetitions`` timed ones."""
    pipeline = DistriPipeline.from_pretrained(
        model_dir, DistriConfig(mode="corrected_async_gn", warmup_steps=4)
    )
    stages: dict[str, list[float]] = {}
    pipe = pipeline.pipe
    pipe.encode_prompt = _timed(stages, "text encoders (PyTorch)", pipe.encode_prompt)
    pipe.vae.decode = _timed(stages, "VAE decode (PyTorch)", pipe.vae.decode)
    pipeline(**call)
    stages.clear()
    totals = []
    for _ in range(repetitions):
        dist.barrier()
        started = time.perf_counter()
        result = pipeline(**call)
        totals.append(time.perf_counter() - started)
    image = None if result is None else (np.asarray(result.images[0]) * 255).round().astype(np.uint8)
    return {"seconds": totals, "stages": stages, "image": image, "threads": torch.get_num_threads()}


def server_statistics(grpc_url: str) -> dict[str, dict[str, float]]:
    """Per model: request count, and summed queue / compute-infer / whole-request seconds."""
    client = grpcclient.InferenceServerClient(grpc_url)
    stats = client.get_inference_statistics(as_json=True)
    client.close()
    found = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})

        def seconds(key: str, inference: dict = inference) -> float:
            return int(inference.get(key, {}).get("ns", 0)) / 1e9

        found[model["name"]] = {
            "count": int(inference.get("success", {}).get("count", 0)),
            "executions": int(model.get("execution_count", 0)),
            "queue_s": seconds("queue"),
            "compute_infer_s": seconds("compute_infer"),
            "compute_io_s": seconds("compute_input") + seconds("compute_output"),
            "request_s": seconds("success"),
        }
    return found


def difference(after: dict, before: dict, requests: int) -> dict[str, dict[str, float]]:
    """Per model and per ensemble request: the mean of each summed time."""
    per_request = {}
    for name, now in after.items():
        then = before.get(name, {})
        per_request[name] = {
            key: (value - then.get(key, 0)) / requests for key, value in now.items() if key.endswith("_s")
        }
        per_request[name]["calls"] = (now["count"] - then.get("count", 0)) / requests
    return per_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="height = width in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repetitions", type=int, default=5, help="timed requests per block")
    parser.add_argument("--rounds", type=int, default=2, help="engine and server blocks, alternated")
    parser.add_argument("--repository", type=Path, help="model repository (default: the CPU one)")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for an idle machine")
    parser.add_argument("--output-dir", type=Path, default=SERVING_RESULTS)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wait_idle:
        log(f"CPUs {wait_idle(timeout=args.wait_idle):.0%} busy")
    repository = (args.repository or ensure_cpu_repository()).resolve()
    request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": args.size, "width": args.size,
               "num_inference_steps": args.steps, "guidance_scale": 5.0, "seed": args.seed}  # fmt: skip
    call = {**request, "output_type": "np"}
    fields = {"prompts": [PROMPT], "negative_prompts": [NEGATIVE], "height": args.size, "width": args.size,
              "num_inference_steps": args.steps, "guidance_scale": 5.0, "seeds": [args.seed]}  # fmt: skip
    engine: list[float] = []
    served: list[float] = []
    stages: dict[str, list[float]] = {}
    server_breakdown: list[dict] = []
    conditions = start_conditions()
    started = time.monotonic()
    log(f"starting tritonserver on {repository}")
    with CpuServer(repository, args.output_dir / "server_overhead.log") as server:
        log(f"server ready in {time.monotonic() - started:.0f} s")
        served_image = generate(server.grpc, **fields)["images"][0]  # untimed first call
        for round_index in range(1, args.rounds + 1):
            log(f"round {round_index}/{args.rounds}: in-process engine, {args.repetitions} requests")
            result = spawn_local(
                engine_timings, 2, (str(MODEL_DIR), call, args.repetitions), threads_per_rank=1
            )
            engine += result["seconds"]
            for name, values in result["stages"].items():
                stages.setdefault(name, []).extend(values)
            log(
                f"  engine: median {statistics.median(result['seconds']):.3f} s ({result['threads']} thread/rank)"
            )
            log(f"round {round_index}/{args.rounds}: through the ensemble, {args.repetitions} requests")
            before = server_statistics(server.grpc)
            block = [generate(server.grpc, **fields)["seconds"] for _ in range(args.repetitions)]
            server_breakdown.append(difference(server_statistics(server.grpc), before, args.repetitions))
            served += block
            log(f"  served: median {statistics.median(block):.3f} s")
    engine_image = result["image"]
    pixel_difference = np.abs(served_image.astype(np.int16) - engine_image.astype(np.int16))
    ratio = statistics.median(served) / statistics.median(engine)
    models = {}
    for name in server_breakdown[0]:
        models[name] = {
            key: statistics.median(block[name][key] for block in server_breakdown)
            for key in server_breakdown[0][name]
        }
    served_rest = statistics.median(served) - sum(
        sum(models[name][key] for key in ("compute_infer_s", "queue_s", "compute_io_s"))
        for name in ENCODER_AND_VAE_MODELS
        if name in models
    )
    engine_rest = statistics.median(engine) - sum(statistics.median(values) for values in stages.values())
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "conditions": conditions,
        "request": request,
        "engine_s": engine,
        "served_s": served,
        "engine_median_s": statistics.median(engine),
        "served_median_s": statistics.median(served),
        "ratio": ratio,
        # The encoders and VAE run on different runtimes (ONNX Runtime served, PyTorch in-process),
        # so the serving layer's own cost is clearest without them.
        "served_without_encoders_and_vae_s": served_rest,
        "engine_without_encoders_and_vae_s": engine_rest,
        "ratio_without_encoders_and_vae": served_rest / engine_rest,
        "target": TARGET,
        "engine_stages_median_s": {name: statistics.median(values) for name, values in stages.items()},
        "server_models_per_request": models,
        "image_max_abs_difference": int(pixel_difference.max()),
        "image_mean_abs_difference": float(pixel_difference.mean()),
    }
    write_json(args.output_dir / "serving_overhead.json", report)
    text = markdown(report, args)
    print(text)
    if args.benchmarks_md:
        update_benchmarks_section(
            "Serving overhead (ensemble vs in-process engine)", text, Path(args.benchmarks_md)
        )
    return 0


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    r = report["request"]
    models = report["server_models_per_request"]
    verdict = "met" if report["ratio"] <= TARGET else "missed"
    lines = [
        f"Measured {report['date']} on {report['machine']}; `python benchmarks/serving_overhead.py` "
        f"({args.rounds} alternating rounds of {args.repetitions} requests each way; {report['conditions']}). One request: "
        f"{r['height']}x{r['width']}, {r['num_inference_steps']} steps, guidance 5, seed {r['seed']}, a "
        f"prompt and a negative prompt, the tiny SDXL model. Both sides: UNet on 2 gloo ranks, 1 thread "
        f"each, corrected_async_gn, warmup_steps 4.",
        "",
        "| path | median (s) | all runs (s) |",
        "|---|---:|---|",
        f"| in-process engine (`DistriPipeline`, PyTorch encoders and VAE) | {report['engine_median_s']:.3f} | "
        f"{', '.join(f'{s:.2f}' for s in report['engine_s'])} |",
        f"| `sdxl` ensemble over gRPC (ONNX Runtime encoders and VAE) | {report['served_median_s']:.3f} | "
        f"{', '.join(f'{s:.2f}' for s in report['served_s'])} |",
        "",
        f"**Ratio served / in-process: {report['ratio']:.3f}x** (target <= {TARGET:.2f}x: {verdict}). "
        f"The images agree within {report['image_max_abs_difference']} grey levels "
        f"(mean {report['image_mean_abs_difference']:.3f}).",
        "",
        "The two sides run the text encoders and the VAE on different runtimes (ONNX Runtime in the "
        "server, PyTorch with 1 thread in-process), so the ratio above mixes the serving layer's cost "
        "with a runtime difference. Without them (served: the client-side median minus the tokenizer, "
        "encoders and VAE models' queue and compute; in-process: the median minus the timed encoder "
        f"and VAE stages): served {report['served_without_encoders_and_vae_s']:.3f} s, in-process "
        f"{report['engine_without_encoders_and_vae_s']:.3f} s, **ratio "
        f"{report['ratio_without_encoders_and_vae']:.3f}x**: the serving layer's own cost (UNet stage "
        "glue, gRPC, the ensemble scheduler, copies between stubs).",
        "",
        "Where the served request's time goes (median per request, Triton's statistics API; compute = "
        "the model's execute(), queue = waiting for the model):",
        "",
        "| model | calls | compute (s) | queue (s) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("tokenizer", "text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        if name in models:
            m = models[name]
            lines.append(f"| {name} | {m['calls']:.0f} | {m['compute_infer_s']:.3f} | {m['queue_s']:.3f} |")
    composed = sum(models[n]["compute_infer_s"] + models[n]["queue_s"] + models[n]["compute_io_s"]
                   for n in models if n != "sdxl")  # fmt: skip
    stages = report["engine_stages_median_s"]
    engine_rest = report["engine_without_encoders_and_vae_s"]
    lines += [
        f"| (ensemble request, server side) | 1 | {models.get('sdxl', {}).get('request_s', 0):.3f} | |",
        "",
        f"Sum of the composing models' time: {composed:.3f} s; the client-side median minus that "
        f"({report['served_median_s'] - composed:+.3f} s) is gRPC, the ensemble scheduler and tensor "
        f"copies between the stubs. In-process stages (median per call, rank 0): "
        + ", ".join(f"{name} {value:.3f} s" for name, value in stages.items())
        + f", everything else (denoising loop, scheduler, latents) {engine_rest:.3f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
