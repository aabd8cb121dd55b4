"""perf_analyzer, as installed by scripts/setup_perf_analyzer.sh, against a started CPU server: a
handful of requests from clients/perf_inputs.json end in a CSV with the expected columns."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from benchmarks.serving_common import (
    PERF_CSV_COLUMNS,
    PERF_INPUTS,
    perf_analyzer_arguments,
    read_perf_csv,
    run_perf_analyzer,
)
from distrifusion.serving.cpu_server import CpuServer, shared_cpu_server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuServer:
    subprocess.run([str(ROOT / "scripts" / "setup_perf_analyzer.sh")], check=True, timeout=600)
    log = tmp_path_factory.mktemp("serving") / "server.log"
    return shared_cpu_server(log, request.config.add_cleanup)


def _successes(server: CpuServer) -> float:
    with urllib.request.urlopen(f"http://{server.metrics}", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('nv_inference_request_success{model="sdxl"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_perf_inputs_match_the_ensemble_and_stay_small(server: CpuServer) -> None:
    metadata = grpcclient.InferenceServerClient(server.grpc).get_model_metadata("sdxl", as_json=True)
    inputs = {entry["name"] for entry in metadata["inputs"]}
    entries = json.loads(PERF_INPUTS.read_text())["data"]
    assert len(entries) >= 4
    assert len({entry["prompt"][0] for entry in entries}) == len(entries)
    assert (
        len({(entry["height"][0], entry["width"][0], entry["num_inference_steps"][0]) for entry in entries})
        > 1
    )
    for entry in entries:
        assert set(entry) <= inputs, set(entry) - inputs
        assert all(len(value) == 1 for value in entry.values())
        assert entry["height"][0] <= 256 and entry["width"][0] <= 256 and entry["num_inference_steps"][0] <= 8


def test_perf_analyzer_writes_the_expected_csv(server: CpuServer, tmp_path: Path) -> None:
    before = _successes(server)
    csv_path = tmp_path / "perf.csv"
    arguments = perf_analyzer_arguments(
        server.grpc, server.metrics, csv_path, PERF_INPUTS, measurement_requests=4, warmup_requests=1,
        max_trials=3, stability=50,
    )  # fmt: skip
    # A fixed request count keeps the test short and deterministic (no stability search).
    run_perf_analyzer([*arguments, "--concurrency-range", "1:1", "--request-count", "4"], tmp_path / "perf.log",
                      progress=None, timeout=240)  # fmt: skip
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[0] == "Concurrency"
    assert set(PERF_CSV_COLUMNS) <= set(header), set(PERF_CSV_COLUMNS) - set(header)
    (row,) = read_perf_csv(csv_path)
    assert row["Concurrency"] == "1"
    assert float(row["Inferences/Second"]) > 0
    p50, p95, p99 = (float(row[f"p{q} latency"]) for q in (50, 95, 99))
    assert 0 < p50 <= p95 <= p99  # microseconds
    assert float(row["Server Compute Infer"]) > 0
    # The warm-up request and the 4 measured ones all reached the ensemble and succeeded.
    assert _successes(server) - before >= 5


def test_perf_analyzer_streams_the_decoupled_model(server: CpuServer, tmp_path: Path) -> None:
    # The recipe of docs/streaming.md, with a fixed request count.
    csv_path = tmp_path / "stream.csv"
    run_perf_analyzer(["-m", "sdxl_stream", "-i", "grpc", "--streaming", "-u", server.grpc,
                       "--input-data", str(PERF_INPUTS), "--concurrency-range", "1:1",
                       "--measurement-mode", "count_windows", "--measurement-request-count", "3",
                       "--request-count", "3", "--percentile", "95", "-f", str(csv_path)],
                      tmp_path / "stream.log", progress=None, timeout=240)  # fmt: skip
    (row,) = read_perf_csv(csv_path)
    assert float(row["Inferences/Second"]) > 0, (tmp_path / "stream.log").read_text()[-2000:]
