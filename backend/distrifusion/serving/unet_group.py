"""A long-lived patch-parallel UNet group for a server: rank 0 in this process, the rest spawned.

The server process (a Triton Python-backend stub) is rank 0. It spawns ranks 1..N-1
(:mod:`.rank_worker`), which load the same UNet and then wait for work.

Faults. A watchdog thread in rank 0 watches the worker processes themselves (a rank that exits,
is killed or OOM-killed is noticed within a tenth of a second, idle or not) and, while a
generation runs, the time since rank 0's device last finished a step (a rank that is stopped,
deadlocked or stuck in a kernel misses the per-step deadline). Steps count when the device has run
them, not when the host queued them (:mod:`distrifusion.step_clock`): on CUDA the host runs ahead.
A step's deadline follows from its work (:mod:`.step_cost`): ``step_deadline_factor`` times the
step the group measured for that size, or for another size scaled by the work, never below
``step_deadline_s``; the group times two short generations at its smallest sizes when it forms, so
every step has a measured basis. Either way the group is *broken*: the surviving workers are
ended by pid, an NCCL process group is aborted (never destroyed while blocked), so rank 0 leaves
the collective it waits in, and the request fails with a :class:`~.faults.GroupFault` naming the
rank, its device, the step and that a retry is safe. A rank that raises is handled the same way.
A rebuild thread then forms a fresh group (new rendezvous, fresh workers; rank 0 keeps its UNet
in memory), warms it up as at load and serves again; requests that arrive meanwhile wait for it.
After ``max_rebuilds`` failed rebuilds within ``rebuild_window_s`` the group gives up and every
request fails with :class:`~.faults.GroupUnavailable`.

Events (the state, live ranks, faults, restarts) go to ``on_event(kind, **details)`` as they
happen, from whichever thread saw them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError, DistriConfig
from ..launch import free_port, init_local_rank, select_device
from ..pipeline import StepProgress
from ..step_clock import StepMark
from ..topology import Topology
from .denoise import (
    TEXT_TOKENS,
    DenoiseRequest,
    DenoiseResult,
    load_unet_pipeline,
    run_denoise,
    warmup_request,
)
from .faults import FaultInjection, FaultPolicy, GroupFault, GroupUnavailable
from .memory import FreeMemory, UNetMemory, free_memory, peak_growth
from .rank_worker import DevicePlacement, RankWorker
from .step_cost import StepTimes, StepWork

_START_TIMEOUT_SECONDS = 600.0
_POLL_SECONDS = 0.1
_CLASSIFY_SECONDS = 2.0
"""How long a failed generation waits for the watchdog to say which rank was lost."""

SERVING, REBUILDING, GAVE_UP, CLOSED = "serving", "rebuilding", "gave_up", "closed"

EventSink = Callable[..., None]


def _never() -> bool:
    return False


def _ignore(kind: str, **details: Any) -> None:
    pass


@dataclasses.dataclass
class _Progress:
    """One generation as the watchdog sees it: the steps the host queued, and when rank 0's device
    last finished one."""

    at: float
    """When the device last finished a step (at first: when the generation started)."""
    deadline_s: float
    basis: str
    first_deadline_s: float
    """The first step's (a compile's, when the step compiles)."""
    first_basis: str
    completed: int = 0
    queued: collections.deque[tuple[int, StepMark]] = dataclasses.field(default_factory=collections.deque)
    _polling: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def poll(self, now: float) -> None:
        """Counts the queued steps the device has finished."""
        with self._polling:
            while self.queued and self.queued[0][1].done():
                step, _ = self.queued.popleft()
                self.completed, self.at = step + 1, now

    def overdue(self, now: float) -> tuple[float, str] | None:
        """(deadline, basis) when the next step is past its deadline."""
        deadline, basis = (
            (self.first_deadline_s, self.first_basis)
            if self.completed == 0
            else (self.deadline_s, self.basis)
        )
        return (deadline, basis) if now - self.at > deadline else None


class UNetGroup:
    """Rank 0 of one patch-parallel group, owning the worker processes of the other ranks.

    ``devices``: GPU indices, one per rank (CUDA), or None on the CPU, where ``ranks`` processes
    share the cores (``threads_per_rank`` each). ``placement`` puts each rank on its device;
    ``policy`` bounds hangs and rebuilds. ``backend``: the process group's (None: NCCL on CUDA,
    gloo on the CPU; gloo lets several ranks share one GPU, which NCCL refuses, for tests).
    """

    def __init__(
        self,
        model_directory: str,
        config: DistriConfig,
        ranks: int,
        devices: list[int] | None = None,
        threads_per_rank: int | None = None,
        placement: DevicePlacement = select_device,
        policy: FaultPolicy | None = None,
        on_event: EventSink = _ignore,
        free_memory_now: FreeMemory | None = None,
        backend: str | None = None,
    ) -> None:
        config.validate_world(ranks)
        if devices is not None and len(devices) != ranks:
            raise ConfigError(f"devices: need one GPU per rank ({ranks}), got {devices}")
        self.model_directory = model_directory
        self.ranks = ranks
        self.config = config
        self.policy = policy or FaultPolicy()
        self.devices: list[str] = []
        """Each rank's device, as the rank itself reported it."""
        self._device_indices = devices
        self._threads = threads_per_rank
        self._placement = placement
        self._backend = backend
        self._on_event = on_event
        self._workers: list[RankWorker] = []
        self._lock = threading.Condition()
        self._run_lock = threading.RLock()
        """Held by whoever runs the group: a generation, or a rebuild (whose warm-up is one)."""
        self._state = REBUILDING
        self._fault: GroupFault | None = None
        self._failed_rebuilds: collections.deque[float] = collections.deque()
        self._warmups: list[tuple[int, int, int]] = []
        self._progress: _Progress | None = None
        self._threads_started: list[threading.Thread] = []
        if threads_per_rank is not None:
            torch.set_num_threads(threads_per_rank)
        if config.device == "cuda":
            # An NCCL error or timeout fails the collective (and aborts its communicator) instead
            # of killing this process, which is the Triton stub.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        self.pipeline: Any = None
        with self._run_lock:
            try:
                self._form()
            except BaseException:
                self._teardown()
                raise
        device = self.pipeline.unet.device
        # On the CPU every rank of the group shares this machine's memory; a GPU is its rank's own.
        self.memory = UNetMemory(
            free_memory_now or free_memory(device, ranks if device.type == "cpu" else 1),
            self.pipeline.pipe.vae_scale_factor,
        )
        self.step_times = StepTimes(
            StepWork.count(self.pipeline.unet.config, TEXT_TOKENS), self.pipeline.pipe.vae_scale_factor
        )
        self._start_thread(self._watch, "distrifusion-watchdog")
        try:
            with self._run_lock:
                self._calibrate()
        except BaseException:
            self.close()
            raise
        self._set_state(SERVING)

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def live_ranks(self) -> int:
        return 1 + sum(worker.alive for worker in self._workers)

    @property
    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._workers if worker.pid is not None]

    def wait_serving(self, timeout: float | None = None) -> str:
        """Blocks while the group is being rebuilt; returns the state it is then in."""
        with self._lock:
            self._lock.wait_for(lambda: self._state != REBUILDING, timeout)
            return self._state

    def _set_state(self, state: str, **details: Any) -> None:
        with self._lock:
            self._state = state
            self._lock.notify_all()
        self._on_event("state", state=state, **details)

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: DenoiseRequest) -> None:
        """Raises ConfigError naming the first field this group cannot run."""
        self.pipeline.validate(
            request.height,
            request.width,
            request.num_inference_steps,
            request.guidance_scale,
            request.scheduler,
        )
        self.memory.check(_unet_rows(request), request.height, request.width, self._holds(request))

    def _holds(self, request: DenoiseRequest) -> bool:
        scale = self.pipeline.pipe.vae_scale_factor
        rows, guided = _unet_rows(request), request.guidance_scale > 1
        return self.pipeline.unet.holds(rows, request.height // scale, request.width // scale, guided)

    def _calibrate(self) -> None:
        """Two short generations at the smallest sizes the group runs, before any other: the first
        pays for the process's one-time set-up; the second, a new shape, measures what a generation
        adds whatever its size (the memory model's fixed part) and times a step of the least work
        (the basis of every deadline until a larger size is timed)."""
        pipeline = self.pipeline
        height, width = pipeline.geometry.smallest_size(pipeline.unet.topology.patch_group(False).size)
        for columns in (width, 2 * width):
            request = warmup_request(pipeline.unet.config, height, columns, TEXT_TOKENS, steps=2)
            with peak_growth(pipeline.unet.device) as peak:
                self._run(dataclasses.replace(request, compile_new_shape=False), _never)
        self.memory.record_fixed(peak[0])

    def warm_up(self, height: int, width: int, text_tokens: int) -> None:
        """Runs every step phase of this size once (two short generations at batch 1), so that
        CUDA graphs are captured, communicators formed and kernels tuned before serving; a rebuilt
        group repeats it."""
        with self._run_lock:
            self._warm_up(height, width, text_tokens)
        self._warmups.append((height, width, text_tokens))

    def _warm_up(self, height: int, width: int, text_tokens: int) -> None:
        unet_config = self.pipeline.unet.config
        # The first generation records the exchange and captures the steady and last steps; the
        # second captures the warm-up steps, which only become graphable once the exchange is fixed.
        first_async = self.config.warmup_steps + 1
        try:
            for steps in (first_async + 3, first_async + 1):
                request = warmup_request(unet_config, height, width, text_tokens, steps)
                held = self._holds(request)
                with peak_growth(self.pipeline.unet.device) as peak:
                    self._run(request, _never)
                self.memory.record(_unet_rows(request), height, width, peak[0], held)
        except Exception as error:
            hint = "".join(
                (
                    " (CUDA graphs are on: build with --no-cuda-graphs to serve eager, measured slower)"
                    if self.config.cuda_graphs
                    else "",
                    f" (torch.compile {self.config.compile} is on: build without --compile to serve eager)"
                    if self.config.compile
                    else "",
                )
            )
            raise RuntimeError(f"warm-up at {width}x{height} failed{hint}: {error}") from error

    def denoise(
        self,
        request: DenoiseRequest,
        should_stop: Callable[[], bool] = _never,
        on_progress: Callable[[StepProgress], None] | None = None,
    ) -> DenoiseResult:
        """Runs the request on every rank; ``should_stop()`` (checked each step) ends it early;
        ``on_progress`` gets each step's progress (see :class:`~distrifusion.pipeline.StepProgress`).

        Raises ConfigError (a field this group cannot run), GroupFault (a rank was lost during
        the request; retrying is safe) or GroupUnavailable (the group gave up, or is closed).
        """
        self.validate(request)
        with self._run_lock:
            if self._state != SERVING:
                raise GroupUnavailable(self.unavailable_reason())
            return self._run(request, should_stop, on_progress)

    def unavailable_reason(self) -> str:
        if self._state == GAVE_UP:
            return (
                f"the UNet group gave up after {self.policy.max_rebuilds} failed rebuilds within "
                f"{self.policy.rebuild_window_s:.0f} s (last fault: {self._fault}); the server needs a restart"
            )
        return f"the UNet group is {self._state}"

    def _run(
        self,
        request: DenoiseRequest,
        should_stop: Callable[[], bool],
        on_progress: Callable[[StepProgress], None] | None = None,
    ) -> DenoiseResult:
        request = dataclasses.replace(
            request,
            prompt_embeds=request.prompt_embeds.detach(),
            pooled_prompt_embeds=request.pooled_prompt_embeds.detach(),
            negative_prompt_embeds=request.negative_prompt_embeds.detach(),
            negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds.detach(),
            seeds=[random.randrange(2**63) if seed is None else seed for seed in request.seeds],
        )
        rows = _unet_rows(request)
        injection = FaultInjection()
        progress = self._progress = self._new_progress(request, rows)

        def on_step(step: int, mark: StepMark) -> None:
            progress.queued.append((step, mark))
            injection.check_step(0, step)

        fault = None
        try:
            for worker in self._workers:
                worker.send("denoise", request)
            result = run_denoise(self.pipeline, request, should_stop, on_step, on_progress)
        except Exception as error:
            progress.poll(time.monotonic())
            fault = self._fault_after(error).at_step(progress.completed + 1, request.num_inference_steps)
        finally:
            self._progress = None
        if fault is not None:
            # Raised outside the except block, so it does not keep the failed generation's frames
            # (its tensors, the lost group's exchange buffers) alive through __context__.
            raise fault
        # The typical step of the latest generation of this size: its median, which one slow step
        # (a capture, a neighbour starting up) does not move.
        steps = [record.seconds for record in self.pipeline.unet.steps]
        if steps:
            self.step_times.record(rows, request.height, request.width, statistics.median(steps))
        return result

    def _new_progress(self, request: DenoiseRequest, rows: int) -> _Progress:
        expected = self.step_times.expected(rows, request.height, request.width)
        policy = self.policy
        deadline = policy.deadline(None if expected is None else expected.seconds)
        if expected is not None and deadline > policy.step_deadline_s:
            basis = f"{policy.step_deadline_factor:g} x {expected.basis}"
        else:
            basis = "the floor"
        first_deadline, first_basis = deadline, basis
        # The first step compiles when a compiled engine warms up a size (and only then).
        if self.config.compile and request.compile_new_shape:
            first_deadline = policy.deadline(None if expected is None else expected.seconds, compiling=True)
            first_basis = "the compile deadline"
        return _Progress(time.monotonic(), deadline, basis, first_deadline, first_basis)

    def _fault_after(self, error: Exception) -> GroupFault:
        """The fault behind a failed generation: the watchdog's, if it names a lost rank within a
        moment (a peer's death reaches rank 0's collective first), else rank 0's own error."""
        with self._lock:
            self._lock.wait_for(lambda: self._fault is not None, _CLASSIFY_SECONDS)
            fault = self._fault
        if fault is None:
            fault = GroupFault("rank_raised", 0, self.devices[0] if self.devices else None,
                               f"raised {type(error).__name__}: {error}")  # fmt: skip
            self._break(fault)
        return self._fault or fault

    # -- faults and rebuilds -------------------------------------------------------------------

    def _watch(self) -> None:
        live = self.live_ranks
        while self._state != CLOSED:
            time.sleep(_POLL_SECONDS)
            try:
                live = self._watch_once(live)
            except Exception as error:  # the watchdog must outlive anything it runs into
                self._on_event("watchdog_error", error=error)

    def _watch_once(self, live: int) -> int:
        now_live = self.live_ranks
        if now_live != live:
            self._on_event("live_ranks", live=now_live, ranks=self.ranks)
        if self._state == GAVE_UP:
            return now_live
        lost = next((w for w in list(self._workers) if not w.alive and not w.ended_by_us), None)
        if lost is not None:
            kind, cause = lost.cause_of_exit()
            self._break(GroupFault(kind, lost.rank, lost.device, cause))
            return now_live
        progress = self._progress
        if progress is None:
            return now_live
        now = time.monotonic()
        progress.poll(now)
        overdue = progress.overdue(now)
        if overdue is not None:
            deadline, basis = overdue
            waited = f"did not finish a step within the {deadline:.1f} s deadline ({basis})"
            stopped = next((w for w in self._workers if w.stopped()), None)
            if stopped is not None:
                self._break(GroupFault("deadline", stopped.rank, stopped.device, f"is stopped and {waited}"))
            else:
                self._break(GroupFault("deadline", None, None, waited))
        return now_live

    def _break(self, fault: GroupFault) -> None:
        """Ends every worker and aborts the process group, so nothing waits on the lost rank;
        a serving group then starts rebuilding (a rebuilding one retries on its own)."""
        with self._lock:
            if self._state in (CLOSED, GAVE_UP):
                return
            first = self._fault is None
            if first:
                self._fault = fault
            workers = list(self._workers)
            rebuild = self._state == SERVING
            if rebuild:
                self._state = REBUILDING
                self._lock.notify_all()
        for worker in workers:
            worker.ended_by_us = True
            if worker.alive:
                worker.process.kill()
        # Another thread may be tearing the process group down: asking for its backend can raise.
        with contextlib.suppress(Exception):
            if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
        if first:
            self._on_event("fault", fault=fault)
        if rebuild:
            self._on_event("state", state=REBUILDING, fault=fault)
            self._start_thread(self._rebuild, "distrifusion-rebuild")

    def _rebuild(self) -> None:
        started = time.monotonic()
        with self._run_lock:  # once the failed generation has left
            while self._state != CLOSED:
                try:
                    self._teardown()
                    self._form()
                    for height, width, text_tokens in self._warmups:
                        self._warm_up(height, width, text_tokens)
                except Exception as error:
                    if self._state == CLOSED:
                        return
                    now = time.monotonic()
                    self._failed_rebuilds.append(now)
                    while (
                        self._failed_rebuilds
                        and now - self._failed_rebuilds[0] > self.policy.rebuild_window_s
                    ):
                        self._failed_rebuilds.popleft()
                    failures = len(self._failed_rebuilds)
                    self._on_event("rebuild_failed", error=error, failures=failures, policy=self.policy)
                    if failures >= self.policy.max_rebuilds:
                        self._teardown()
                        self._set_state(GAVE_UP, error=error, policy=self.policy)
                        return
                    time.sleep(min(2.0**failures, 10.0))
                    continue
                fault, self._fault = self._fault, None
                self._set_state(SERVING, fault=fault, seconds=time.monotonic() - started)
                self._on_event(
                    "restart", reason=fault.kind if fault else "unknown", seconds=time.monotonic() - started
                )
                return

    # -- forming and ending the group ----------------------------------------------------------

    def _form(self) -> None:
        """Spawns the workers, joins the process group and loads (or re-wires) the UNet."""
        port = free_port()
        indices = self._device_indices
        self._workers = [self._spawn(rank, port) for rank in range(1, self.ranks)]
        device = self._placement(self.config.device, indices[0] if indices else None)
        self.devices = [str(device)]
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        for worker in self._workers:
            worker.wait_for(
                "placed", max(0.0, deadline - time.monotonic()), stop=lambda: self._state == CLOSED
            )
        if self.ranks > 1:
            timeout = datetime.timedelta(seconds=self.policy.collective_timeout_s)
            init_local_rank(0, self.ranks, port, self.config.device, timeout=timeout, backend=self._backend)
        if self.pipeline is None:
            self.pipeline = load_unet_pipeline(self.model_directory, self.config, device)
        else:
            # The weights stay in this process; only the ranks, their buffers and graphs are new.
            self.pipeline.unet.use_topology(
                Topology.from_process_group(self.config.split_batch), abandon=True
            )
        for worker in self._workers:
            worker.wait_for(
                "ready", max(0.0, deadline - time.monotonic()), stop=lambda: self._state == CLOSED
            )
            self.devices.append(worker.device)
        self._on_event("live_ranks", live=self.live_ranks, ranks=self.ranks)

    def _spawn(self, rank: int, port: int) -> RankWorker:
        index = self._device_indices[rank] if self._device_indices else None
        return RankWorker(
            rank,
            self.ranks,
            port,
            self.config,
            self.model_directory,
            index,
            self._placement,
            self._threads,
            self.policy.collective_timeout_s,
            self._backend,
        )

    def _teardown(self) -> None:
        for worker in self._workers:
            worker.end()
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads_started.append(thread)
        thread.start()

    def close(self) -> None:
        """Stops the workers (they finish what they run) and leaves the process group."""
        with self._lock:
            self._state = CLOSED
            self._lock.notify_all()
        for worker in self._workers:
            worker.stop()
        with self._run_lock:
            self._teardown()
        for thread in self._threads_started:
            if thread is not threading.current_thread():
                thread.join(timeout=10)


def _unet_rows(request: DenoiseRequest) -> int:
    """Rows of the UNet's input: every prompt, twice under classifier-free guidance."""
    return request.prompt_embeds.shape[0] * (2 if request.guidance_scale > 1 else 1)
