"""End to end: the CPU model repository served by a real tritonserver, called over HTTP and gRPC."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from processes import descendants, still_running_after
from tritonclient.utils import InferenceServerException
from unet_requests import unet_inputs

from clients.sdxl_client import build_inputs, generate
from distrifusion.launch import spawn_local
from distrifusion.serving.cpu_server import (
    CpuServer,
    cpu_repository,
    metric_total,
    scrape_metrics,
    shared_cpu_server,
)

pytestmark = pytest.mark.server

SMALL = {"height": 128, "width": 128, "num_inference_steps": 4}
RANKS = 2  # scripts/cpu_repository.sh's --unet-ranks


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    # The CPU repository's server, shared with test_high_resolution, test_perf_analyzer and
    # test_soak: a start costs 30-50 s here. This module runs after them and its last test stops it.
    return shared_cpu_server(tmp_path_factory.mktemp("serving") / "server.log", request.config.add_cleanup)


def test_ready_and_metadata(server: CpuServer) -> None:
    with httpclient.InferenceServerClient(server.http) as client:
        assert client.is_server_live() and client.is_server_ready()
        for model in (
            "sdxl",
            "tokenizer",
            "text_encoder",
            "text_encoder_2",
            "unet",
            "vae_decoder",
            "vae_encoder",
        ):
            assert client.is_model_ready(model), model
    metadata = grpcclient.InferenceServerClient(server.grpc).get_model_metadata("sdxl", as_json=True)
    inputs = {entry["name"]: entry["datatype"] for entry in metadata["inputs"]}
    assert inputs == {
        "prompt": "BYTES",
        "negative_prompt": "BYTES",
        "height": "INT32",
        "width": "INT32",
        "num_inference_steps": "INT32",
        "guidance_scale": "FP32",
        "seed": "INT64",
        "scheduler": "BYTES",
        "input_image": "UINT8",
        "strength": "FP32",
        "first_pass_size": "INT32",
    }
    assert {entry["name"] for entry in metadata["outputs"]} == {"image", "used_seed", "truncated"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generation_over_both_protocols(server: CpuServer, protocol: str) -> None:
    url = server.grpc if protocol == "grpc" else server.http
    result = generate(url, protocol, prompts=["a lighthouse at dawn"], seeds=[3], height=128, width=192,
                      num_inference_steps=4)  # fmt: skip
    images = result["images"]
    assert images.dtype == np.uint8 and images.shape == (1, 128, 192, 3)
    assert result["seeds"] == [3] and result["truncated"] == [False]
    assert images.std() > 0


def test_the_standard_library_rest_client_gets_the_same_image(server: CpuServer, tmp_path: Path) -> None:
    """clients/rest_request.py: what the GPU check sends where tritonclient is not installed."""
    output = tmp_path / "fox.png"
    command = [sys.executable, "-m", "clients.rest_request", "--url", server.http, "--prompt", "a red fox",
               "--seed", "5", "--height", "128", "--width", "128", "--steps", "4", "--output", str(output)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["seed"] == 5
    expected = generate(server.grpc, prompts=["a red fox"], seeds=[5], **SMALL)["images"][0]
    with Image.open(output) as image:
        assert np.array_equal(np.asarray(image), expected)
    refused = subprocess.run([*command[:-2], "--height", "130", "--output", str(output)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "HTTP 400" in refused.stderr and "height" in refused.stderr


def test_same_seed_same_image_other_seed_other_image(server: CpuServer) -> None:
    first = generate(server.grpc, prompts=["a red fox"], seeds=[5], **SMALL)["images"]
    again = generate(server.grpc, prompts=["a red fox"], seeds=[5], **SMALL)["images"]
    other = generate(server.grpc, prompts=["a red fox"], seeds=[6], **SMALL)["images"]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_missing_seed_is_drawn_and_reported(server: CpuServer) -> None:
    result = generate(server.grpc, prompts=["a red fox"], **SMALL)
    (seed,) = result["seeds"]
    again = generate(server.grpc, prompts=["a red fox"], seeds=[seed], **SMALL)
    assert np.array_equal(result["images"], again["images"])


def test_served_image_equals_the_in_process_engine(server: CpuServer) -> None:
    from distributed_cases import generate_cases

    # The model the served repository was built from (its UNet stage runs corrected_async_gn
    # with 4 warm-up steps, the build's defaults).
    model = json.loads((cpu_repository() / "build_manifest.json").read_text())["model"]
    request = {"prompt": "a lighthouse at dawn", "negative_prompt": "fog", "seed": 9, **SMALL}
    served = generate(server.grpc, prompts=[request["prompt"]], negative_prompts=[request["negative_prompt"]],
                      seeds=[9], **SMALL)["images"]  # fmt: skip
    case = {
        "config": {"mode": "corrected_async_gn", "warmup_steps": 4},
        "call": {**request, "output_type": "np"},
    }
    (in_process,) = spawn_local(generate_cases, RANKS, (model, [case]), threads_per_rank=1)
    expected = (np.asarray(in_process) * 255).round().astype(np.int16)
    difference = np.abs(served.astype(np.int16) - expected)
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_batched_request_and_concurrent_requests(server: CpuServer) -> None:
    batch = generate(server.grpc, prompts=["a red fox", "a blue bird"], seeds=[1, 2], **SMALL)
    assert batch["images"].shape == (2, 128, 128, 3) and batch["seeds"] == [1, 2]
    single = generate(server.grpc, prompts=["a blue bird"], seeds=[2], **SMALL)["images"][0]
    assert np.abs(batch["images"][1].astype(int) - single.astype(int)).max() <= 2

    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    for seed in (11, 12, 13):
        inputs = build_inputs(grpcclient, ["a green field"], seeds=[seed], **SMALL)
        client.async_infer("sdxl", inputs, callback=lambda result, error: results.put((result, error)))
    for _ in range(3):
        result, error = results.get(timeout=300)
        assert error is None, error
        assert result.as_numpy("image").shape == (1, 128, 128, 3)


BAD_REQUESTS = {
    "missing prompt": ({"prompt": None}, "prompt"),
    "empty prompt": ({"prompt": [b""]}, "prompt"),
    "height not a multiple of 8": ({"height": 130}, "height"),
    "height beyond the built range": ({"height": 4128}, "height"),  # the CPU repository's: 4096
    "zero steps": ({"num_inference_steps": 0}, "num_inference_steps"),
    "absurd steps": ({"num_inference_steps": 100000}, "num_inference_steps"),
    "NaN guidance": ({"guidance_scale": float("nan")}, "guidance_scale"),
    "negative guidance": ({"guidance_scale": -2.0}, "guidance_scale"),
    "unknown scheduler": ({"scheduler": [b"warp_drive"]}, "scheduler"),
    "non-UTF-8 prompt": ({"prompt": [b"\xff\xfe bad"]}, "prompt"),
}


def _raw_inputs(fields: dict) -> list:
    values = {"prompt": [b"a red fox"], "height": 128, "width": 128, "num_inference_steps": 2, **fields}
    inputs = []
    for name, value in values.items():
        if value is None:
            continue
        if name in ("prompt", "scheduler"):
            array, datatype = np.array(value, dtype=np.object_).reshape(1, 1), "BYTES"
        elif name == "guidance_scale":
            array, datatype = np.array([[value]], dtype=np.float32), "FP32"
        else:
            array, datatype = np.array([[value]], dtype=np.int32), "INT32"
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_input_is_named_and_the_server_keeps_serving(server: CpuServer, case: str) -> None:
    fields, field = BAD_REQUESTS[case]
    client = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("sdxl", _raw_inputs(fields))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", raised.value
    assert field in raised.value.message()
    assert generate(server.grpc, prompts=["a red fox"], seeds=[1], height=128, width=128,
                    num_inference_steps=1)["images"].shape == (1, 128, 128, 3)  # fmt: skip


def test_wrong_dtype_and_shape_are_rejected_over_http(server: CpuServer) -> None:
    client = httpclient.InferenceServerClient(server.http)
    prompt = httpclient.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a red fox"]], dtype=np.object_))
    wrong_dtype = httpclient.InferInput("height", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.array([[128.0]], dtype=np.float32))
    wrong_shape = httpclient.InferInput("width", [1, 2], "INT32")
    wrong_shape.set_data_from_numpy(np.array([[128, 128]], dtype=np.int32))
    for bad in (wrong_dtype, wrong_shape):
        with pytest.raises(InferenceServerException) as raised:
            client.infer("sdxl", [prompt, bad])
        assert raised.value.status() == "400", raised.value
        assert bad.name() in raised.value.message()
    client.close()


def _cancel_after(server: CpuServer, model: str, inputs: list, seconds: float) -> dict:
    """Sends ``inputs`` to ``model`` and cancels it ``seconds`` later; returns the metrics before.

    (The UNet's metrics are updated when a request ends, so they cannot tell when it started.)
    """
    before = scrape_metrics(server.metrics)
    client = grpcclient.InferenceServerClient(server.grpc)
    done: queue.Queue = queue.Queue()
    future = client.async_infer(model, inputs, callback=lambda result, error: done.put(error))
    time.sleep(seconds)
    future.cancel()
    error = done.get(timeout=60)
    assert error is not None and "CANCELLED" in str(error.status())
    return before


def test_cancelled_unet_request_stops_between_steps(server: CpuServer) -> None:
    before = _cancel_after(server, "unet", unet_inputs(steps=1000), seconds=5)
    result = generate(server.grpc, prompts=["next"], seeds=[2], **SMALL)  # queued behind the cancelled one
    assert result["images"].shape == (1, 128, 128, 3)
    after = scrape_metrics(server.metrics)
    cancelled = metric_total(after, "distrifusion_failures_total", kind="cancelled")
    assert cancelled == metric_total(before, "distrifusion_failures_total", kind="cancelled") + 1
    steps = metric_total(after, "distrifusion_unet_steps_total") - metric_total(
        before, "distrifusion_unet_steps_total"
    )
    # ~30 steps run in the 5 s before the cancel on an idle 2-core machine; uncancelled it runs 1000
    assert steps < 250, f"{steps} UNet steps ran: the cancelled request was not stopped"


def test_cancelled_ensemble_request_answers_cancelled_and_the_server_keeps_serving(server: CpuServer) -> None:
    # Triton 2.51's ensemble marks only the steps it schedules after the cancel as cancelled, not
    # the UNet step already running (triton-inference-server/server#6739): that step finishes.
    long_request = build_inputs(
        grpcclient, ["a long one"], seeds=[1], height=512, width=512, num_inference_steps=30
    )
    _cancel_after(server, "sdxl", long_request, seconds=5)
    result = generate(server.grpc, prompts=["next"], seeds=[2], **SMALL)
    assert result["images"].shape == (1, 128, 128, 3)


def test_unet_metrics_are_scraped_from_the_metrics_port(server: CpuServer) -> None:
    before = scrape_metrics(server.metrics)
    generate(server.grpc, prompts=["a red fox"], seeds=[1], height=128, width=128, num_inference_steps=8)
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(server.grpc).infer("sdxl", _raw_inputs({"height": 130}))
    after = scrape_metrics(server.metrics)

    def added(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    # 8 steps with warmup_steps 4: steps 0..4 synchronous, 5..7 asynchronous
    assert added("distrifusion_unet_steps_total", phase="warmup") == 5
    assert added("distrifusion_unet_steps_total", phase="async") == 3
    assert added("distrifusion_unet_step_seconds_count") == 8
    assert added("distrifusion_unet_step_seconds_sum") > 0
    assert added("distrifusion_unet_communication_wait_seconds_count", phase="async") == 3
    assert added("distrifusion_images_total") == 1
    assert added("distrifusion_failures_total", kind="invalid_argument") == 1
    assert metric_total(after, "distrifusion_live_ranks", model="unet") == RANKS


def test_stopping_the_server_leaves_no_worker_behind(server: CpuServer) -> None:
    # Runs last in this module, the last one that uses the shared server: stops it with SIGTERM, as
    # an orchestrator does (a later caller of shared_cpu_server would start a new one).
    tree = descendants(server.process.pid)
    assert tree, "expected the stub and its worker ranks"
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=120)
    assert still_running_after(tree, seconds=15) == set()
