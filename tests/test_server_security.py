"""The served CPU server tried as any client on the cluster network would: every API that changes
what the server runs or reads needs the operator's key, over HTTP and gRPC; readiness follows the
ensemble; the UNet stage's queue is bounded. Attacks are sent as raw requests where tritonclient
would hide what goes over the wire.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as system_shm

from build_engines.repository import parse_config
from clients.operator import main as operator_main
from clients.sdxl_client import generate, queue_full
from distrifusion.serving.cpu_server import (
    CpuServer,
    cpu_repository,
    metric_total,
    scrape_metrics,
    shared_cpu_server,
)
from distrifusion.serving.operator_key import GRPC_HEADER, HEADER, read_key

pytestmark = pytest.mark.server

SMALL = {"height": 128, "width": 128, "num_inference_steps": 2}
RESTRICTED = "This API is restricted"
GRPC_RESTRICTED = "This protocol is restricted"


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    return shared_cpu_server(tmp_path_factory.mktemp("serving") / "server.log", request.config.add_cleanup)


@pytest.fixture(scope="module")
def key() -> str:
    return read_key()


def http_call(
    server: CpuServer, path: str, body: dict | None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """An HTTP request as any client can send it: (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{server.http}{path}",
        data=data,
        method="GET" if body is None else "POST",
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def refused_over_grpc(call) -> str:
    with pytest.raises(InferenceServerException) as refusal:
        call()
    assert refusal.value.status() == "StatusCode.UNAVAILABLE"
    assert GRPC_RESTRICTED in refusal.value.message()
    return refusal.value.message()


def model_states(server: CpuServer, key: str) -> dict[str, str]:
    status, body = http_call(server, "/v2/repository/index", {}, {HEADER: key})
    assert status == 200, body
    return {entry["name"]: entry.get("state", "") for entry in json.loads(body)}


def upload_parameters(marker: Path) -> dict[str, str]:
    """The load API's parameters that upload a Python model whose initialize() writes ``marker``."""
    code = (
        "import pathlib\n\n\nclass TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        f"        pathlib.Path({str(marker)!r}).write_text('uploaded code ran')\n\n"
        "    def execute(self, requests):\n        return []\n"
    )
    config = {
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
    }
    return {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code.encode()).decode()}


def test_uploaded_model_code_runs_only_with_the_key(server: CpuServer, key: str, tmp_path: Path) -> None:
    marker = tmp_path / "uploaded-code-ran"
    parameters = upload_parameters(marker)
    status, body = http_call(server, "/v2/repository/models/probe/load", {"parameters": parameters})
    assert (status, RESTRICTED in body) == (403, True), body
    wrong = {HEADER: key[:-1] + ("0" if key[-1] != "0" else "1")}
    status, body = http_call(server, "/v2/repository/models/probe/load", {"parameters": parameters}, wrong)
    assert status == 403, body
    grpc = grpcclient.InferenceServerClient(server.grpc)
    files = {"file:1/model.py": base64.b64decode(parameters["file:1/model.py"])}
    refused_over_grpc(lambda: grpc.load_model("probe", config=parameters["config"], files=files))
    # The HTTP header name over gRPC is not the key's metadata name: still refused.
    refused_over_grpc(
        lambda: grpc.load_model("probe", config=parameters["config"], files=files, headers={HEADER: key})
    )
    time.sleep(1)
    assert not marker.exists(), "the uploaded code ran"
    assert "probe" not in model_states(server, key)

    # The operator, with the key, can: the same upload runs.
    status, body = http_call(
        server, "/v2/repository/models/probe/load", {"parameters": parameters}, {HEADER: key}
    )
    try:
        assert status == 200, body
        assert marker.read_text() == "uploaded code ran"
    finally:
        http_call(server, "/v2/repository/models/probe/unload", {}, {HEADER: key})
    server.wait_ready(30)  # an UNLOADING model holds Triton's strict readiness false for a moment


def test_unload_and_load_need_the_key(server: CpuServer, key: str) -> None:
    for action in ("unload", "load"):
        status, body = http_call(server, f"/v2/repository/models/sdxl/{action}", {})
        assert (status, RESTRICTED in body) == (403, True), body
    grpc = grpcclient.InferenceServerClient(server.grpc)
    refused_over_grpc(lambda: grpc.unload_model("sdxl"))
    refused_over_grpc(lambda: grpc.load_model("sdxl"))
    refused_over_grpc(lambda: grpc.get_model_repository_index())
    assert http_call(server, "/v2/repository/index", {})[0] == 403
    assert model_states(server, key)["sdxl"] == "READY"
    assert server.readiness() == 200


def test_shared_memory_registration_needs_the_key(server: CpuServer, key: str) -> None:
    region = {"key": "/distrifusion_attack", "offset": 0, "byte_size": 64}
    status, body = http_call(server, "/v2/systemsharedmemory/region/attack/register", region)
    assert (status, RESTRICTED in body) == (403, True), body
    assert (
        http_call(server, "/v2/cudasharedmemory/region/attack/register", {"raw_handle": {"b64": ""}})[0]
        == 403
    )
    assert http_call(server, "/v2/systemsharedmemory/status", None)[0] == 403
    grpc = grpcclient.InferenceServerClient(server.grpc)
    refused_over_grpc(lambda: grpc.register_system_shared_memory("attack", "/distrifusion_attack", 64))
    refused_over_grpc(lambda: grpc.get_system_shared_memory_status())

    # With the key the operator registers a real region, sees it, and unregisters it.
    handle = system_shm.create_shared_memory_region("operator", "/distrifusion_operator", 64)
    try:
        client = httpclient.InferenceServerClient(server.http)
        client.register_system_shared_memory("operator", "/distrifusion_operator", 64, headers={HEADER: key})
        assert [r["name"] for r in client.get_system_shared_memory_status(headers={HEADER: key})] == [
            "operator"
        ]
        client.unregister_system_shared_memory("operator", headers={HEADER: key})
        assert grpc.get_system_shared_memory_status(headers={GRPC_HEADER: key}).regions == {}
    finally:
        system_shm.destroy_shared_memory_region(handle)


def test_trace_and_logging_changes_need_the_key(server: CpuServer, key: str, tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.json"
    change = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_file": str(trace_file)}
    assert http_call(server, "/v2/trace/setting", change)[0] == 403
    assert http_call(server, "/v2/models/sdxl/trace/setting", change)[0] == 403
    assert (
        http_call(server, "/v2/logging", {"log_verbose_level": 2, "log_file": str(tmp_path / "log")})[0]
        == 403
    )
    assert http_call(server, "/v2/logging", None)[0] == 403
    grpc = grpcclient.InferenceServerClient(server.grpc)
    refused_over_grpc(lambda: grpc.update_trace_settings(settings=change))
    refused_over_grpc(lambda: grpc.update_log_settings(settings={"log_verbose_level": 2}))
    client = httpclient.InferenceServerClient(server.http)
    assert client.get_log_settings(headers={HEADER: key})["log_verbose_level"] == 0
    assert client.get_trace_settings(headers={HEADER: key})["trace_level"] == ["OFF"]
    assert not trace_file.exists()

    # With the key: a change takes effect, and is undone.
    settings = grpc.update_log_settings(
        settings={"log_verbose_level": 1}, headers={GRPC_HEADER: key}, as_json=True
    )
    assert settings["settings"]["log_verbose_level"]["uint32_param"] == 1
    assert (
        client.update_log_settings(settings={"log_verbose_level": 0}, headers={HEADER: key})[
            "log_verbose_level"
        ]
        == 0
    )
    assert (
        client.update_trace_settings(settings={"trace_rate": "500"}, headers={HEADER: key})["trace_rate"]
        == "500"
    )
    assert (
        client.update_trace_settings(settings={"trace_rate": "1000"}, headers={HEADER: key})["trace_rate"]
        == "1000"
    )


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_clients_keep_every_open_api_without_a_key(server: CpuServer, protocol: str) -> None:
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc if protocol == "grpc" else server.http
    client = module.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sdxl")
    assert client.get_server_metadata() and client.get_model_metadata("sdxl")
    assert client.get_model_config("sdxl")
    assert client.get_inference_statistics("sdxl")
    result = generate(url, protocol=protocol, prompts=["a red square"], seeds=[1], **SMALL)
    assert result["images"].shape == (1, 128, 128, 3)


def test_an_operator_unload_of_the_ensemble_turns_readiness_false(server: CpuServer, key: str) -> None:
    assert server.readiness() == 200
    assert operator_main(["unload", "sdxl", "--url", server.http]) == 0
    started = time.monotonic()
    while server.readiness() == 200 and time.monotonic() - started < 10:
        time.sleep(0.1)
    assert server.readiness() != 200, "still ready 10 s after sdxl was unloaded"
    took = time.monotonic() - started
    try:
        time.sleep(1)  # the supervisor publishes on its next poll
        samples = scrape_metrics(server.supervisor_metrics)
        assert metric_total(samples, "distrifusion_model_ready", model="sdxl") == 0
        assert metric_total(samples, "distrifusion_model_ready", model="unet") == 1
        assert metric_total(samples, "distrifusion_ready") == 0
        assert "not ready: sdxl is UNAVAILABLE (unloaded)" in server.log_tail(20000)
        time.sleep(2)
        assert server.readiness() != 200, "the supervisor loaded back what the operator unloaded"
    finally:
        assert operator_main(["load", "sdxl", "--url", server.grpc, "--protocol", "grpc"]) == 0
        server.wait_ready(60)
    print(f"readiness false {took:.1f} s after the unload")
    time.sleep(1)
    samples = scrape_metrics(server.supervisor_metrics)
    assert metric_total(samples, "distrifusion_model_ready", model="sdxl") == 1
    assert metric_total(samples, "distrifusion_ready") == 1
    assert generate(server.grpc, prompts=["again"], seeds=[2], **SMALL)["images"].shape == (1, 128, 128, 3)


def test_requests_beyond_the_queue_bound_are_refused_at_once(server: CpuServer) -> None:
    unet = parse_config((cpu_repository() / "unet" / "config.pbtxt").read_text())
    bound, batch = unet.dynamic_batching.default_queue_policy.max_queue_size, unet.max_batch_size
    assert bound >= 1
    # At most one batch runs and `bound` requests wait; the rest must be refused, while the first
    # batch (30 steps) is still running.
    sent = 2 * (bound + batch)
    outcomes: list[tuple[str, float, str, str]] = []
    started = time.monotonic()

    def send(index: int) -> None:
        protocol = ("grpc", "http")[index % 2]
        url = server.grpc if protocol == "grpc" else server.http
        fields = {**SMALL, "num_inference_steps": 30}
        try:
            generate(url, protocol=protocol, prompts=[f"flood {index}"], seeds=[index], **fields)
            outcomes.append(("served", time.monotonic() - started, protocol, ""))
        except InferenceServerException as error:
            kind = "refused" if queue_full(error) else "failed"
            outcomes.append(
                (kind, time.monotonic() - started, protocol, f"{error.status()} {error.message()}")
            )

    threads = [threading.Thread(target=send, args=(index,)) for index in range(sent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not [o for o in outcomes if o[0] == "failed"]
    refused = [o for o in outcomes if o[0] == "refused"]
    served = [o for o in outcomes if o[0] == "served"]
    assert len(refused) + len(served) == sent
    assert len(refused) >= sent - bound - batch, outcomes
    for _, _, protocol, message in refused:
        assert message.startswith("StatusCode.UNAVAILABLE" if protocol == "grpc" else "503"), message
    assert {protocol for _, _, protocol, _ in refused} == {"grpc", "http"}
    # At once: every refusal came back before the first admitted request was done.
    assert max(o[1] for o in refused) < min(o[1] for o in served), outcomes
    assert server.readiness() == 200
