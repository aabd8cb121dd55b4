"""A served UNet group that loses a rank, without a server: detected, the request in flight failed
with a named, retryable error, the group rebuilt, and the next request served as before.

One group (2 gloo ranks, this process is rank 0) goes through every case in order; the last one
makes it give up. Faults are real: SIGKILL and SIGSTOP by pid, and the test-only injection file
(``DISTRIFUSION_FAULT_INJECTION``) for a rank that raises or fails to start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from device_stand_ins import LaggingDevice
from diffusers import StableDiffusionXLPipeline
from processes import still_running_after

from distrifusion.config import DistriConfig
from distrifusion.serving.denoise import DenoiseRequest
from distrifusion.serving.faults import INJECTION_VARIABLE, FaultPolicy, GroupFault, GroupUnavailable
from distrifusion.serving.rank_worker import RankWorker
from distrifusion.serving.unet_group import GAVE_UP, REBUILDING, SERVING, UNetGroup, _unet_rows
from distrifusion.step_clock import STEPS_AHEAD

POLICY = FaultPolicy(step_deadline_s=3.0, max_rebuilds=2, rebuild_window_s=300.0, collective_timeout_s=60.0)


@pytest.fixture(scope="module")
def request_of(tiny_sdxl_dir: Path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a lighthouse", negative_prompt="fog")

    def make(steps: int = 5) -> DenoiseRequest:
        return DenoiseRequest(embeds, pooled, negative, negative_pooled, seeds=[11], height=128, width=128,
                              num_inference_steps=steps, guidance_scale=5.0)  # fmt: skip

    return make


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INJECTION_VARIABLE, str(path))  # the workers inherit it
        yield path


@pytest.fixture(scope="module")
def events() -> list:
    return []


@pytest.fixture(scope="module")
def group(tiny_sdxl_dir: Path, faults: Path, events: list) -> Iterator[UNetGroup]:
    unet_group = UNetGroup(
        str(tiny_sdxl_dir), DistriConfig(), ranks=2, threads_per_rank=1, policy=POLICY,
        on_event=lambda kind, **details: events.append((time.monotonic(), kind, details)),
    )  # fmt: skip
    yield unet_group
    pids = unet_group.worker_pids
    unet_group.close()
    assert still_running_after(pids, seconds=10) == set()


@pytest.fixture(scope="module")
def clean(group: UNetGroup, request_of) -> torch.Tensor:
    return group.denoise(request_of()).latents


def restarts(events: list) -> list[str]:
    return [details["reason"] for _, kind, details in events if kind == "restart"]


def denoise_in_background(group: UNetGroup, request: DenoiseRequest) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = group.denoise(request)
        except Exception as error:
            outcome["error"] = error
        outcome["at"] = time.monotonic()

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def test_a_worker_killed_while_idle_is_noticed_and_replaced(group, request_of, events, clean) -> None:
    (old,) = group.worker_pids
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    while group.state == SERVING and time.monotonic() - killed < 5:
        time.sleep(0.05)
    assert group.state == REBUILDING, "a lost rank is noticed within 5 s, with no request running"
    noticed = time.monotonic() - killed
    assert group.wait_serving(timeout=30) == SERVING, "serving again within 30 s"
    assert group.worker_pids != [old] and restarts(events) == ["rank_exited"]
    lost = [details for _, kind, details in events if kind == "live_ranks" and details["live"] == 1]
    assert lost, "the live-rank count changes when the rank is lost, not at the next request"
    assert torch.equal(group.denoise(request_of()).latents, clean)
    print(f"noticed after {noticed:.2f} s, serving again after {time.monotonic() - killed:.1f} s")


def test_a_worker_killed_during_a_request_fails_it_promptly_and_says_why(group, request_of, clean) -> None:
    running = denoise_in_background(group, request_of(steps=400))
    time.sleep(1.0)
    (pid,) = group.worker_pids
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    running["thread"].join(timeout=30)
    error = running.get("error")
    assert isinstance(error, GroupFault), running
    assert running["at"] - killed < 10
    message = str(error)
    assert "rank 1 (cpu) was killed by SIGKILL at step" in message and "of 400" in message
    assert "safe to retry" in message
    assert group.wait_serving(timeout=30) == SERVING
    assert torch.equal(group.denoise(request_of()).latents, clean)


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_raises_fails_the_request_and_the_group_is_rebuilt(
    group, request_of, faults, clean, rank
) -> None:
    faults.write_text(json.dumps({"raise": [{"rank": rank, "step": 2}]}))
    with pytest.raises(
        GroupFault, match=rf"rank {rank} \(cpu\) raised RuntimeError: injected fault"
    ) as raised:
        group.denoise(request_of())
    assert raised.value.kind == "rank_raised"
    assert group.wait_serving(timeout=30) == SERVING
    assert torch.equal(group.denoise(request_of()).latents, clean), "the next output equals a clean run's"


def test_a_stopped_worker_is_caught_by_the_step_deadline_and_ended(group, request_of, events) -> None:
    timed = request_of(steps=8)
    group.denoise(timed)  # times this shape's steps (the deadline: 10x the median step, >= 3 s)
    expected = group.step_times.expected(_unet_rows(timed), timed.height, timed.width)
    assert expected is not None, "the generation was timed"
    running = denoise_in_background(group, request_of(steps=400))
    time.sleep(1.0)
    (pid,) = group.worker_pids
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    running["thread"].join(timeout=30)
    error = running.get("error")
    assert isinstance(error, GroupFault) and error.kind == "deadline", running
    found = re.search(
        r"rank 1 \(cpu\) is stopped and did not finish a step within the ([\d.]+) s deadline", str(error)
    )
    assert found, error
    deadline = float(found.group(1))
    # The deadline the message names is the one the policy derives from the timed step (to the
    # message's one decimal), not merely at least the floor.
    assert deadline == pytest.approx(POLICY.deadline(expected.seconds), abs=0.051)
    assert deadline - 1.0 <= running["at"] - stopped < deadline + 5.0
    assert still_running_after([pid], seconds=5) == set(), "the stopped process is ended"
    assert group.wait_serving(timeout=30) == SERVING
    assert restarts(events)[-1] == "deadline"


@contextlib.contextmanager
def rank_0_device(group: UNetGroup, device: LaggingDevice, events: list) -> Iterator[LaggingDevice]:
    """Rank 0's steps finish on ``device``; a fault the group reports aborts it (as an NCCL abort
    fails the collective its device waits in)."""
    seen = len(events)

    def abort_on_fault() -> None:
        while not device.lost.is_set():
            if any(kind == "fault" for _, kind, _ in events[seen:]):
                device.lost.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=abort_on_fault, daemon=True)
    group.pipeline.clock = device
    watcher.start()
    try:
        yield device
    finally:
        group.pipeline.clock = None
        device.lost.set()
        watcher.join()


def test_a_device_running_behind_the_host_is_timed_by_the_steps_it_finished(
    group, request_of, events
) -> None:
    """Every step finishes 0.4 s after the one before: 25 steps take 10 s on the device, over three
    times the 3 s deadline. On CUDA the host would queue them all at once and then wait out the
    backlog with no heartbeat; here the host runs at most STEPS_AHEAD steps ahead, and the watchdog
    heartbeats on the steps the device finished."""
    restarted = restarts(events)
    with rank_0_device(group, LaggingDevice(step_s=0.4), events) as device:
        result = group.denoise(request_of(steps=25))
    assert not result.interrupted and len(device.finishes) == 25
    assert device.most_queued <= STEPS_AHEAD + 1, "the host ran further ahead of the device"
    assert restarts(events) == restarted, "a healthy group was declared dead"


def test_a_larger_size_than_any_timed_gets_a_deadline_from_its_work(group, request_of, events) -> None:
    """Its steps take 4 s on this device, over the 3 s floor, which a size never timed used to get;
    the deadline is now 10 x the step expected from a timed size scaled by the work (a 1024x1024
    step is about 100 times the work of a 128x128 one)."""
    restarted = restarts(events)
    request = dataclasses.replace(request_of(steps=2), height=1024, width=1024)
    expected = group.step_times.expected(2, 1024, 1024)
    assert expected is not None and "scaled by the work" in expected.basis
    assert expected.seconds >= 4.0, expected
    with rank_0_device(group, LaggingDevice(step_s=4.0), events):
        assert not group.denoise(request).interrupted
    assert restarts(events) == restarted


def test_a_cancel_reaches_a_device_running_behind_within_steps_ahead(group, request_of, events) -> None:
    with rank_0_device(group, LaggingDevice(step_s=0.3), events) as device:
        seen: list[int] = []

        def cancelled_once_four_steps_ran() -> bool:
            if not seen and device.finished() >= 4:
                seen.append(len(device.finishes))
            return bool(seen)

        result = group.denoise(request_of(steps=40), cancelled_once_four_steps_ran)
    assert result.interrupted
    ran = len(group.pipeline.unet.steps)
    assert ran == seen[0] <= 4 + STEPS_AHEAD + 1, (ran, seen)


def test_a_device_that_stops_finishing_steps_misses_the_deadline(group, request_of, events) -> None:
    """The host keeps queueing (on CUDA: kernel launches return) while the device never finishes
    step 3; heartbeats on queued steps would never stop coming. The deadline is the one the group
    derives from this size's latest timed steps (the floor unless a loaded machine made them slow)."""
    request = request_of(steps=50)
    expected = group.step_times.expected(_unet_rows(request), request.height, request.width)
    assert expected is not None, "earlier cases timed this size"
    deadline = POLICY.deadline(expected.seconds)
    missed = f"did not finish a step within the {deadline:.1f} s deadline"
    with rank_0_device(group, LaggingDevice(step_s=0.05, hang_from=3), events):
        started = time.monotonic()
        with pytest.raises(GroupFault, match=re.escape(missed)):
            group.denoise(request)
    assert time.monotonic() - started < deadline + 5.0
    assert restarts(events)[-1] == "deadline"
    assert group.wait_serving(timeout=30) == SERVING


def test_the_watchdog_outlives_its_own_errors(group, request_of, events, monkeypatch) -> None:
    """Asking a process group torn down by another thread for its backend raises; so may anything the
    watchdog runs. It reports the error and keeps watching: a rank lost after it is still noticed."""
    original_cause, original_backend = RankWorker.cause_of_exit, dist.get_backend
    failures = []

    def cause_of_exit_fails_once(worker: RankWorker) -> tuple[str, str]:
        if not failures:
            failures.append(True)
            raise RuntimeError("injected: /proc could not be read")
        return original_cause(worker)

    def backend_being_torn_down(*args: object) -> str:
        if threading.current_thread().name == "distrifusion-watchdog":
            raise RuntimeError("injected: the default process group is being destroyed")
        return original_backend(*args)

    monkeypatch.setattr(RankWorker, "cause_of_exit", cause_of_exit_fails_once)
    monkeypatch.setattr(dist, "get_backend", backend_being_torn_down)
    for attempt in ("the errors", "after them"):
        (pid,) = group.worker_pids
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while group.state == SERVING and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert group.state == REBUILDING, f"the watchdog notices a lost rank ({attempt})"
        assert group.wait_serving(timeout=30) == SERVING
        assert restarts(events)[-1] == "rank_exited"
    assert [kind for _, kind, _ in events].count("watchdog_error") == 1
    (watchdog,) = [t for t in threading.enumerate() if t.name == "distrifusion-watchdog"]
    assert watchdog.is_alive()


def test_repeated_failed_rebuilds_give_up(group, request_of, faults, events) -> None:
    """Both failed rebuilds are the injected start failure, and the give-up names the kill that
    started them: not some other fault that happened to come along."""
    faults.write_text(json.dumps({"fail_start": [1]}))
    seen = len(events)
    (pid,) = group.worker_pids
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group.state == SERVING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.wait_serving(timeout=60) == GAVE_UP
    failed = [str(details["error"]) for _, kind, details in events[seen:] if kind == "rebuild_failed"]
    assert len(failed) == 2 and all("injected fault: rank 1 fails to start" in e for e in failed), failed
    with pytest.raises(GroupUnavailable, match="gave up after 2 failed rebuilds") as raised:
        group.denoise(request_of())
    assert "last fault: rank 1 (cpu) was killed by SIGKILL" in str(raised.value), raised.value
