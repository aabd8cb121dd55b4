"""The decoupled sdxl_stream model on the CPU server: step progress and previews over a gRPC stream,
the ensemble's image at the end, cancellation (by the client, and by a client killed mid-stream),
the same errors as sdxl, and its metrics."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from unet_requests import unet_inputs

from clients.sdxl_client import StepUpdate, build_inputs, generate, stream
from distrifusion.serving.cpu_server import (
    CpuServer,
    checkout_root,
    cpu_repository,
    metric_total,
    scrape_metrics,
    shared_cpu_server,
)
from distrifusion.serving.stream import refused_message

SMALL = {"height": 256, "width": 256}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    return shared_cpu_server(tmp_path_factory.mktemp("serving") / "server.log", request.config.add_cleanup)


def _metrics(server: CpuServer) -> dict:
    return scrape_metrics(server.metrics)


def test_a_stream_reports_every_step_and_its_previews_then_the_ensembles_image(server: CpuServer) -> None:
    before = _metrics(server)
    updates: list[StepUpdate] = []
    fields = {
        "prompts": ["a red circle on a blue background"],
        "seeds": [11],
        "num_inference_steps": 8,
        **SMALL,
    }
    streamed = stream(server.grpc, preview_every=2, on_step=updates.append, **fields)
    assert [(update.step, update.total) for update in updates] == [(step, 8) for step in range(1, 9)]
    previews = {update.step: update.preview for update in updates if update.preview is not None}
    assert sorted(previews) == [2, 4, 6, 8]
    assert all(
        preview.shape == (1, 256, 256, 3) and preview.dtype == np.uint8 for preview in previews.values()
    )
    ensemble = generate(server.grpc, **fields)
    assert np.array_equal(streamed["images"], ensemble["images"])
    assert streamed["seeds"] == [11] and streamed["truncated"] == [False]
    # The last step's x0 is the final latent: its preview shows the picture (a red circle on blue).
    final = previews[8][0].astype(float)
    red = (final[..., 0] > final[..., 2] + 60).mean()
    blue = (final[..., 2] > final[..., 0] + 60).mean()
    assert 0.02 < red < 0.6 and blue > 0.3, (red, blue)

    after = _metrics(server)
    assert (
        metric_total(after, "distrifusion_stream_previews_total")
        == metric_total(before, "distrifusion_stream_previews_total") + 4
    )
    assert (
        metric_total(after, "distrifusion_stream_progress_total")
        == metric_total(before, "distrifusion_stream_progress_total") + 8
    )
    assert (
        metric_total(after, "distrifusion_stream_requests_total", outcome="success")
        == metric_total(before, "distrifusion_stream_requests_total", outcome="success") + 1
    )
    assert (
        metric_total(after, "distrifusion_stream_first_progress_seconds_count")
        == metric_total(before, "distrifusion_stream_first_progress_seconds_count") + 1
    )
    assert metric_total(after, "distrifusion_stream_active") == 0


def test_a_batch_streams_one_preview_per_prompt_at_the_size_asked_for(server: CpuServer) -> None:
    updates: list[StepUpdate] = []
    fields = {"prompts": ["a red circle", "a green square"], "seeds": [1, 2], "num_inference_steps": 3}
    result = stream(
        server.grpc, preview_every=3, preview_size=64, on_step=updates.append, height=256, width=128, **fields
    )
    assert [update.step for update in updates] == [1, 2, 3]
    assert updates[-1].preview.shape == (2, 64, 32, 3)  # the longer side 64, the aspect ratio kept
    assert result["images"].shape == (2, 256, 128, 3) and result["seeds"] == [1, 2]


def _unet_steps_and_cancels(server: CpuServer) -> tuple[float, float]:
    samples = _metrics(server)
    return (
        metric_total(samples, "distrifusion_unet_steps_total"),
        metric_total(samples, "distrifusion_failures_total", kind="cancelled"),
    )


def test_a_cancelled_stream_stops_between_steps_and_the_group_serves_the_next(server: CpuServer) -> None:
    before = _metrics(server)
    steps_before, cancels_before = _unet_steps_and_cancels(server)
    seen: list[int] = []

    def cancel_at_step_3(update: StepUpdate) -> bool:
        seen.append(update.step)
        return update.step >= 3

    fields = {"prompts": ["a long one"], "seeds": [5], "num_inference_steps": 200, **SMALL}
    assert stream(server.grpc, on_step=cancel_at_step_3, **fields) is None
    assert seen == [1, 2, 3]
    result = generate(server.grpc, prompts=["next"], seeds=[2], num_inference_steps=2, **SMALL)
    assert result["images"].shape == (1, 256, 256, 3)
    steps_after, cancels_after = _unet_steps_and_cancels(server)
    assert cancels_after == cancels_before + 1
    # 200 uncancelled; the cancel lands within a step or two of step 3, plus the next request's 2.
    assert steps_after - steps_before < 20, steps_after - steps_before
    samples = _metrics(server)
    assert (
        metric_total(samples, "distrifusion_stream_requests_total", outcome="cancelled")
        == metric_total(before, "distrifusion_stream_requests_total", outcome="cancelled") + 1
    )
    assert metric_total(samples, "distrifusion_stream_active") == 0


def test_a_client_killed_mid_stream_stops_the_denoising(server: CpuServer, tmp_path: Path) -> None:
    steps_before, cancels_before = _unet_steps_and_cancels(server)
    command = [sys.executable, str(checkout_root() / "clients" / "sdxl_client.py"), "--url", server.grpc,
               "--prompt", "a killed client", "--seed", "4", "--steps", "300", "--height", "256", "--width", "256",
               "--stream", "--preview-every", "1", "--output-dir", str(tmp_path)]  # fmt: skip
    client = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("preview_0_step002.png")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("preview_0_step002.png")), "no preview of step 2 within 120 s"
    client.kill()
    client.wait()
    deadline = time.monotonic() + 60
    while _unet_steps_and_cancels(server)[1] == cancels_before and time.monotonic() < deadline:
        time.sleep(0.5)
    steps_after, cancels_after = _unet_steps_and_cancels(server)
    assert cancels_after == cancels_before + 1, "the killed client's request was not cancelled"
    assert steps_after - steps_before < 60, steps_after - steps_before  # of 300
    assert (
        generate(server.grpc, prompts=["next"], seeds=[2], num_inference_steps=2, **SMALL)["images"].std() > 0
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"height": 100}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"scheduler": "nonsense"}, "scheduler"),
        ({"prompts": [""]}, "prompt"),
    ],
)
def test_a_bad_input_gets_the_same_error_as_sdxl(server: CpuServer, fields: dict, field: str) -> None:
    request = {"prompts": ["a circle"], "num_inference_steps": 2, **SMALL, **fields}
    with pytest.raises(InferenceServerException) as from_ensemble:
        generate(server.grpc, **request)
    with pytest.raises(InferenceServerException) as from_stream:
        stream(server.grpc, **request)
    assert field in from_stream.value.message()
    # The ensemble prefixes "in ensemble 'sdxl', " to its composing model's message.
    assert from_ensemble.value.message() == f"in ensemble 'sdxl', {from_stream.value.message()}"
    # A stream's error carries its message only (gRPC's ModelStreamInferResponse has no status).


@pytest.mark.parametrize(
    ("previews", "message"),
    [
        ({"preview_every": -1}, "preview_every: a step count >= 0"),
        ({"preview_size": 8}, "preview_size: the longer side of a preview, 16 to 1024 pixels, got 8"),
    ],
)
def test_bad_preview_settings_are_named(server: CpuServer, previews: dict, message: str) -> None:
    with pytest.raises(InferenceServerException, match=re.escape(message)):
        stream(server.grpc, prompts=["a circle"], num_inference_steps=2, **SMALL, **previews)


def test_the_unet_refuses_a_progress_token_no_stream_listens_on(server: CpuServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc)
    for token, message in (
        ("0" * 32, "progress_token: no stream of this server listens on"),
        ("../../../etc/passwd", "progress_token: expected 32 lowercase hex digits"),
    ):
        inputs = unet_inputs(steps=2, progress_token=np.array([[token.encode()]], dtype=np.object_))
        with pytest.raises(InferenceServerException, match=re.escape(message)):
            client.infer("unet", inputs)
    with pytest.raises(InferenceServerException, match="only a streamed request"):
        client.infer("unet", unet_inputs(steps=2, preview_every=np.array([[1]], np.int32)))
    client.close()


def test_streams_beyond_the_bound_are_refused_at_once_and_the_rest_finish(server: CpuServer) -> None:
    # Not cancelled: on tritonserver 2.51 cancelling the other streams after a refusal crashed the
    # server (docs/streaming.md, "Known limits").
    config = (cpu_repository() / "sdxl_stream" / "config.pbtxt").read_text()
    bound = int(re.search(r'string_value: "(\d+)"', config)[1])
    before = _metrics(server)
    clients, responses = [], queue.Queue()
    inputs = build_inputs(grpcclient, ["a queued one"], seeds=[1], num_inference_steps=2, **SMALL)
    for index in range(bound + 1):
        client = grpcclient.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error, index=index: responses.put((index, result, error)))
        client.async_stream_infer("sdxl_stream", inputs)
        clients.append(client)
    errors, images = {}, 0
    while len(errors) + images < bound + 1:
        index, result, error = responses.get(timeout=300)
        if error is not None:
            errors[index] = error.message()
        elif result.as_numpy("image") is not None:
            images += 1
    for client in clients:
        client.stop_stream()
        client.close()
    assert list(errors.values()) == [refused_message(bound)] and images == bound
    after = _metrics(server)
    assert metric_total(after, "distrifusion_stream_active") == 0
    assert (
        metric_total(after, "distrifusion_stream_requests_total", outcome="refused")
        == metric_total(before, "distrifusion_stream_requests_total", outcome="refused") + 1
    )
