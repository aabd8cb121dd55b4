"""The VAE engines' working memory under ONNX Runtime, against the cost model of
distrifusion.vae.footprint: what calibrates its live-activation factors.

    python -m benchmarks.vae_memory [--models tiny,sdxl]

For each model's three VAE graphs (exported as the CPU target exports them: attention fused), each
call shape runs in a fresh process: ONNX Runtime's session with the served options, then the peak
resident memory that two calls at the shape add to it (distrifusion.serving.memory.peak_growth, as
the UNet stage measures its own). The factor is that
increase over the bytes of the decoder's largest activation at that shape.

Models: ``tiny``, the CPU repository's engines (what the CPU server runs); ``sdxl``, the SDXL VAE's
architecture (config below) with random weights, exported into a temporary folder. Writes
benchmarks/results/vae_memory.json and its table to BENCHMARKS.md ("VAE memory").
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import log, machine_line, publish, start_conditions
from benchmarks.serving_common import BENCHMARKS_MD
from demo_model import SHIPPED
from distrifusion.vae.decode import ENGINES, TILE_ENGINE, TILE_STATISTICS_ENGINE, WHOLE_ENGINE
from distrifusion.vae.footprint import LIVE_ACTIVATIONS, DecoderFootprint

RESULTS = Path(__file__).resolve().parent / "results" / "vae_memory.json"
SECTION = "## VAE memory (`benchmarks/vae_memory.py`)"

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (diffusers AutoencoderKL).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}

# (batch, latent height, latent width) per graph. ONNX Runtime's peak is not proportional to the size:
# sides that are multiples of 3 cost about 1.4x more per pixel (its convolutions' working buffers), so
# both kinds are measured; the tile graphs at several tiles per call, as served.
SHAPES = {
    "tiny": {WHOLE_ENGINE: [(1, 96, 96), (1, 128, 128), (1, 192, 192), (1, 256, 256)],
             TILE_STATISTICS_ENGINE: [(2, 48, 48), (1, 64, 64), (8, 64, 64)],
             TILE_ENGINE: [(2, 48, 48), (1, 64, 64), (8, 64, 64)]},
    "sdxl": {WHOLE_ENGINE: [(1, 48, 48), (1, 64, 64), (1, 96, 96)],
             TILE_STATISTICS_ENGINE: [(1, 48, 48), (2, 64, 64)],
             TILE_ENGINE: [(1, 48, 48), (2, 64, 64)]},
}  # fmt: skip


def _feeds(
    session: Any, batch: int, height: int, width: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    feeds = {}
    for graph_input in session.get_inputs():
        if graph_input.name == "latents":
            feeds["latents"] = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
        elif graph_input.name == "weights":
            feeds["weights"] = rng.uniform(0.1, 1.0, (batch, 1, height, width)).astype(np.float32)
        else:  # statistics: mean 0, variance 1, half of them mixed into each tile's own
            statistics = np.zeros((batch, *graph_input.shape[1:]), np.float32)
            statistics[..., 1:] = (1.0, 0.5)
            feeds["statistics"] = statistics
    return feeds


def measure_in_this_process(onnx_path: str, batch: int, height: int, width: int) -> int:
    """Peak resident bytes two calls at the shape add to a session just created (its weights loaded)."""
    import torch

    from distrifusion.export.onnx_export import ort_session
    from distrifusion.serving.memory import peak_growth

    session = ort_session(onnx_path)
    feeds = _feeds(session, batch, height, width, np.random.default_rng(0))
    with peak_growth(torch.device("cpu")) as peak:
        # Twice, as a served engine is called: ONNX Runtime's memory pattern, when on, allocated
        # a second copy of the peak at the second call of a shape.
        for _ in range(2):
            session.run(None, feeds)
    return peak[0]


def measure(onnx_path: Path, batch: int, height: int, width: int) -> int:
    command = [sys.executable, "-m", "benchmarks.vae_memory", "--measure", str(onnx_path), str(batch), str(height),
               str(width)]  # fmt: skip
    done = subprocess.run(
        command, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent
    )
    return int(done.stdout.strip())


def export_sdxl(folder: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    import torch
    from diffusers import AutoencoderKL

    from distrifusion.export.onnx_export import export_stage, vae_decoder_cases, vae_stage_modules

    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval()
    paths = {}
    for name, (module, spec) in vae_stage_modules(vae).items():
        example = vae_decoder_cases(4, [(2, 8, 8)], seed=1, module=module)[0]
        paths[name] = export_stage(
            module, spec, folder / name / "model.onnx", example, fused_attention=True
        ).path
    return paths, dict(vae.config)


def run(models: list[str], repository: Path | None) -> dict[str, Any]:
    from distrifusion.serving.cpu_server import ensure_cpu_repository

    rows = []
    with tempfile.TemporaryDirectory(prefix="vae-memory-") as tmp:
        for model in models:
            if model == "tiny":
                repository = repository or ensure_cpu_repository()
                paths = {name: repository / name / "1" / "model.onnx" for name in ENGINES}
                config = json.loads((SHIPPED / "vae" / "config.json").read_text())
            else:
                log("exporting the SDXL VAE's graphs (random weights) ...")
                paths, config = export_sdxl(Path(tmp))
            footprint = DecoderFootprint.from_config(config)
            for engine, shapes in SHAPES[model].items():
                for batch, height, width in shapes:
                    peak = measure(paths[engine], batch, height, width)
                    largest = (
                        footprint.largest_tensor_elements(batch, height, width) * footprint.bytes_per_element
                    )
                    row = {"model": model, "engine": engine, "batch": batch, "latent": [height, width],
                           "peak_mib": peak / 2**20, "largest_activation_mib": largest / 2**20,
                           "factor": peak / largest, "cost_model_factor": LIVE_ACTIVATIONS[engine]}  # fmt: skip
                    log(f"  {row}")
                    rows.append(row)
    return {"rows": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} ({report['conditions']}). ONNX Runtime "
        f"{report['onnxruntime']}, the served session options, attention fused (`MultiHeadAttention`). Peak: "
        "resident memory two calls add to a new session; factor: that over the decoder's largest activation "
        "(fp32) at the shape; the cost model (`distrifusion.vae.footprint.LIVE_ACTIVATIONS`) must not be below "
        "it (it adds 256 MiB per call for the served stub's own overhead).",
        "",
        "| model | engine | tiles x latent | largest activation (MiB) | peak (MiB) | factor | cost model |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        height, width = row["latent"]
        lines.append(
            f"| {row['model']} | {row['engine']} | {row['batch']} x {height}x{width} | "
            f"{row['largest_activation_mib']:.0f} | {row['peak_mib']:.0f} | {row['factor']:.2f} | "
            f"{row['cost_model_factor']:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,sdxl")
    parser.add_argument("--repository", type=Path, help="a CPU model repository (default: the CPU server's)")
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    parser.add_argument(
        "--measure", nargs=4, metavar=("ONNX", "BATCH", "HEIGHT", "WIDTH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.measure:
        path, *shape = args.measure
        print(measure_in_this_process(path, *map(int, shape)))
        return 0
    import onnxruntime

    conditions = start_conditions()
    report = {"date": datetime.date.today().isoformat(), "machine": machine_line(), "conditions": conditions,
              "onnxruntime": onnxruntime.__version__, **run(args.models.split(","), args.repository)}  # fmt: skip
    publish(RESULTS, report, markdown(report), args.benchmarks_md, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
