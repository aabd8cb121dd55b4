"""The whole ensemble at size, over gRPC on the CPU server (the demo model, 2 UNet ranks): the CPU
repository (scripts/cpu_repository.sh) decodes images of more than 1024 x 1024 pixels in tiles
(--vae-tile-above), so the 3072x1024 request here takes the tiled path, and the client writes it
(2048², the same way, in test_image_to_image's two-pass request)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrifusion.geometry import ModelGeometry
from distrifusion.serving.cpu_server import (
    CpuServer,
    cpu_repository,
    metric_total,
    scrape_metrics,
    shared_cpu_server,
)
from distrifusion.vae.decode import DecodeSettings
from distrifusion.vae.quality import border_contrast, tile_borders

pytestmark = [pytest.mark.server, pytest.mark.slow]

MIN_PIXEL_STD = 8.0
MAX_BORDER_CONTRAST = 1.5


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    # Shared with test_perf_analyzer, test_soak and test_triton_server (whose last test stops it).
    return shared_cpu_server(tmp_path_factory.mktemp("serving") / "server.log", request.config.add_cleanup)


# 2048² is checked the same way by test_image_to_image's two-pass request, whose final decode is
# the ensemble's own at that size.
@pytest.mark.parametrize(("width", "height"), [(3072, 1024)])
def test_a_large_request_is_decoded_in_tiles_and_written_by_the_client(
    server, width, height, tmp_path
) -> None:
    before = scrape_metrics(server.metrics)
    command = [sys.executable, "-m", "clients.sdxl_client", "--url", server.grpc, "--prompt", "a red fox",
               "--seed", "3", "--width", str(width), "--height", str(height), "--steps", "1",
               "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (path,) = json.loads(done.stdout)["images"]
    with Image.open(path) as image:
        assert (image.size, image.mode) == ((width, height), "RGB")
        pixels = np.asarray(image)
    # A picture, not a black or flat one, and no step where the tiles meet: the steps between
    # neighbouring pixels across the repository's tile borders within 1.5x of those elsewhere
    # (0.97 at 2048², 1.08 at 3072x1024 here; diffusers' own tiling reaches 1.36-1.88 on this VAE,
    # BENCHMARKS.md "VAE tiling").
    assert pixels.std() > MIN_PIXEL_STD and 16 < pixels.mean() < 240, (pixels.mean(), pixels.std())
    plan = DecodeSettings.load(cpu_repository() / "vae_decoder" / "1").plan(height // 8, width // 8)
    seams = border_contrast(pixels, tile_borders([r * plan.scale for r in plan.rows], plan.tile_height * plan.scale),
                            tile_borders([c * plan.scale for c in plan.columns], plan.tile_width * plan.scale))  # fmt: skip
    print(f"{width}x{height}: mean {pixels.mean():.1f}, std {pixels.std():.1f}, border contrast {seams:.2f}")
    assert len(plan) > 1 and seams < MAX_BORDER_CONTRAST, seams
    after = scrape_metrics(server.metrics)

    def added(path: str) -> float:
        return metric_total(after, "distrifusion_vae_decodes_total", path=path) - metric_total(
            before, "distrifusion_vae_decodes_total", path=path
        )

    assert (added("tiled"), added("whole")) == (1, 0)
    assert f"vae_decoder: {width}x{height} decoded in " in server.log_tail(200_000)


def test_a_request_naming_only_a_prompt_and_a_seed_gets_the_native_size(server, tmp_path) -> None:
    """The repository accepts up to 4096 x 4096; a request that names no size gets the model's
    native size (its UNet's sample size: 256 x 256 for the demo model, 1024 x 1024 for SDXL) and its
    default 30 steps, not the largest
    size (a 3072 x 3072 default failed its first request after 100 s at the step deadline's floor)."""
    command = [sys.executable, "-m", "clients.sdxl_client", "--url", server.grpc, "--prompt", "a red fox",
               "--seed", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (path,) = json.loads(done.stdout)["images"]
    with Image.open(path) as image:
        model = Path(json.loads((cpu_repository() / "build_manifest.json").read_text())["model"])
        native = ModelGeometry.read(model)
        assert image.size == (native.default_size, native.default_size)
