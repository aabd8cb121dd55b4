"""Image-to-image and two-pass requests through the served ensemble on the CPU server (the demo
model, 2 UNet ranks): the client's flags, the sizes (1024² encodes whole, 2048² in tiles), the
metrics that name each pass, cancellation in either pass, and the bad inputs refused."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clients.sdxl_client import StepUpdate, generate, stream
from demo_model.scenes import random_scene, render
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

SCENE = random_scene(11)
MIN_PIXEL_STD = 8.0
MAX_BORDER_CONTRAST = 1.5  # as test_high_resolution's


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    return shared_cpu_server(tmp_path_factory.mktemp("serving") / "server.log", request.config.add_cleanup)


def _added(before: dict, after: dict, metric: str, **labels: str) -> float:
    return metric_total(after, metric, **labels) - metric_total(before, metric, **labels)


def _grey(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).convert("L").resize((64, 64)), dtype=np.float64)


def test_an_image_to_image_request_follows_its_picture_at_1024(server: CpuServer, tmp_path: Path) -> None:
    picture = tmp_path / "scene.png"
    render(SCENE, 300, 200).save(picture)  # another size and aspect: resized to the request's
    before = scrape_metrics(server.metrics)
    command = [sys.executable, "-m", "clients.sdxl_client", "--url", server.grpc, "--prompt", SCENE.caption,
               "--seed", "5", "--image", str(picture), "--strength", "0.5", "--width", "1024",
               "--height", "1024", "--steps", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["seeds"] == [5]
    with Image.open(summary["images"][0]) as image:
        assert image.size == (1024, 1024)
        pixels = np.asarray(image)
    # Half the schedule from the picture keeps its layout: the result correlates with it.
    source = np.asarray(Image.open(picture).convert("RGB").resize((1024, 1024), Image.Resampling.LANCZOS))
    correlation = np.corrcoef(_grey(pixels).ravel(), _grey(source).ravel())[0, 1]
    print(f"img2img 1024²: correlation with the picture {correlation:.2f}, std {pixels.std():.1f}")
    assert correlation > 0.8 and pixels.std() > 8, correlation
    after = scrape_metrics(server.metrics)
    assert _added(before, after, "distrifusion_passes_total", **{"pass": "image_to_image"}) == 1
    assert _added(before, after, "distrifusion_vae_encodes_total", path="whole") == 1
    # 2 of the 4 steps run: strength 0.5 is diffusers' share of the schedule.
    assert _added(before, after, "distrifusion_unet_steps_total") == 2


def test_a_two_pass_request_refines_its_first_pass_at_2048_in_tiles(
    server: CpuServer, tmp_path: Path
) -> None:
    """Also the served 2048² tiled decode's check (test_high_resolution's other size): the final
    decode is the ensemble's own, tiled above 1024²."""
    before = scrape_metrics(server.metrics)
    command = [sys.executable, "-m", "clients.sdxl_client", "--url", server.grpc, "--prompt", SCENE.caption,
               "--seed", "6", "--first-pass", "256x256", "--strength", "0.5", "--width", "2048",
               "--height", "2048", "--steps", "2", "--output-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["seeds"] == [6]
    with Image.open(summary["images"][0]) as image:
        assert (image.size, image.mode) == ((2048, 2048), "RGB")
        pixels = np.asarray(image)
    assert pixels.std() > MIN_PIXEL_STD and 16 < pixels.mean() < 240, (pixels.mean(), pixels.std())
    plan = DecodeSettings.load(cpu_repository() / "vae_decoder" / "1").plan(2048 // 8, 2048 // 8)
    scale = plan.scale
    seams = border_contrast(pixels, tile_borders([r * scale for r in plan.rows], plan.tile_height * scale),
                            tile_borders([c * scale for c in plan.columns], plan.tile_width * scale))  # fmt: skip
    print(f"two-pass 2048²: mean {pixels.mean():.1f}, std {pixels.std():.1f}, border contrast {seams:.2f}")
    assert len(plan) > 1 and seams < MAX_BORDER_CONTRAST, seams
    after = scrape_metrics(server.metrics)
    for name in ("first_pass", "second_pass"):
        assert _added(before, after, "distrifusion_passes_total", **{"pass": name}) == 1, name
    assert _added(before, after, "distrifusion_vae_encodes_total", path="tiled") == 1
    # The first pass (at the demo model's trained 256²) decodes whole, the final 2048² in tiles.
    assert _added(before, after, "distrifusion_vae_decodes_total", path="whole") == 1
    assert _added(before, after, "distrifusion_vae_decodes_total", path="tiled") == 1
    assert _added(before, after, "distrifusion_unet_steps_total") == 2 + 1
    log = server.log_tail(200_000)
    assert "vae_encoder: 2048x2048 encoded in " in log and "vae_decoder: 2048x2048 decoded in " in log


def test_two_passes_at_512_match_their_parts_and_one_seed_repeats(server: CpuServer) -> None:
    """The first pass is the text-to-image request at its size; the second, image-to-image from
    that image with the same seed: the two-pass result is their composition."""
    base = {"prompts": [SCENE.caption], "seeds": [9], "num_inference_steps": 4}
    draft = generate(server.grpc, **base, height=256, width=256)["images"][0]
    refined = generate(server.grpc, **base, height=512, width=512, input_image=draft, strength=0.5)["images"][
        0
    ]
    both = generate(server.grpc, **base, height=512, width=512, first_pass_size=(256, 256), strength=0.5)
    assert np.array_equal(both["images"][0], refined)
    again = generate(server.grpc, **base, height=512, width=512, first_pass_size=(256, 256), strength=0.5)
    assert np.array_equal(again["images"][0], refined)


def _passes(server: CpuServer) -> tuple[float, float, float]:
    samples = scrape_metrics(server.metrics)
    return (
        metric_total(samples, "distrifusion_passes_total", **{"pass": "first_pass"}),
        metric_total(samples, "distrifusion_passes_total", **{"pass": "second_pass"}),
        metric_total(samples, "distrifusion_failures_total", kind="cancelled"),
    )


@pytest.mark.parametrize(("cancel_at", "in_pass"), [(1, "first"), (7, "second")])
def test_a_two_pass_stream_cancelled_in_either_pass_stops_there(
    server: CpuServer, cancel_at: int, in_pass: str
) -> None:
    # 6 steps from the prompt, then 3 (strength 0.5) refining: steps 1-6 are the first pass.
    first_before, second_before, cancels_before = _passes(server)
    totals = []

    def cancel(update: StepUpdate) -> bool:
        totals.append(update.total)
        return update.step >= cancel_at

    fields = {"prompts": [SCENE.caption], "seeds": [2], "num_inference_steps": 6, "height": 512,
              "width": 512, "first_pass_size": (256, 256), "strength": 0.5}  # fmt: skip
    assert stream(server.grpc, on_step=cancel, **fields) is None
    assert set(totals) == {9}  # one progress over both passes
    # The group serves the next request (which waits for the cancelled one to stop).
    assert generate(server.grpc, prompts=["a red circle"], num_inference_steps=2)["images"].shape[0] == 1
    first_after, second_after, cancels_after = _passes(server)
    assert cancels_after == cancels_before + 1
    assert first_after == first_before + 1
    assert second_after == second_before + (in_pass == "second")


def _error(server: CpuServer, **fields: object) -> str:
    with pytest.raises(InferenceServerException) as caught:
        generate(server.grpc, prompts=[SCENE.caption], num_inference_steps=2, **fields)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    return caught.value.message()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"input_image": np.zeros((64, 64, 3), np.uint8), "strength": 0.0},
            r"strength: .* in \(0, 1\], got 0$",
        ),
        (
            {"input_image": np.zeros((64, 64, 3), np.uint8), "strength": 1.5},
            r"strength: .* in \(0, 1\], got 1.5",
        ),
        ({"input_image": np.zeros((64, 64, 3), np.uint8), "strength": float("nan")}, r"strength: .* got nan"),
        ({"strength": 0.5}, r"strength: only an image-to-image \(input_image\) or two-pass"),
        (
            {"input_image": np.zeros((4100, 16, 3), np.uint8)},
            r"input_image: 16x4100 pixels; each side must be 8 to 4096",
        ),
        (
            {"input_image": np.zeros((60, 100, 3), np.uint8)},
            r"input_image: generating at its size, 100x60, fails: .*send height and width",
        ),
        (
            {"first_pass_size": (250, 256), "height": 512, "width": 512},
            r"first_pass_size: 250x256 .* multiples of 32",
        ),
        (
            {"first_pass_size": (512, 256), "height": 256, "width": 512},
            r"first_pass_size: 512x256 .* larger than the request's 256x512",
        ),
        (
            {"first_pass_size": (256, 256), "input_image": np.zeros((64, 64, 3), np.uint8)},
            r"first_pass_size: a two-pass request .* not both",
        ),
        (
            {"input_image": np.zeros((64, 64, 3), np.uint8), "strength": 0.2, "height": 256, "width": 256},
            r"strength: 0.2 of 2 steps runs none",
        ),
    ],
)
def test_bad_image_inputs_are_refused_naming_the_field(server: CpuServer, fields: dict, message: str) -> None:
    error = _error(server, **fields)
    assert re.search(message, error), error


def test_an_image_of_the_wrong_layout_is_refused_by_the_server(server: CpuServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc)
    prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a red circle"]], dtype=np.object_))
    image = grpcclient.InferInput("input_image", [1, 64, 64, 4], "UINT8")
    image.set_data_from_numpy(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(InferenceServerException, match=r"input_image.*\[-1,-1,-1,3\]"):
        client.infer("sdxl", [prompt, image])
    floats = grpcclient.InferInput("input_image", [1, 64, 64, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(InferenceServerException, match=r"input_image.*(UINT8|FP32)"):
        client.infer("sdxl", [prompt, floats])
    client.close()
