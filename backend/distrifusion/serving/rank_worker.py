"""The ranks 1..N-1 of a served UNet group: spawned processes that load the UNet and denoise what
rank 0 sends them.

Requests arrive over a pipe (not a collective: an idle worker would hit the collective timeout);
the denoising itself runs on every rank with torch.distributed. A worker exits when told to, when
its parent disappears (a killed stub does not signal its children), and after a failed request:
it reports the traceback first, and rank 0, which notices the exit, rebuilds the group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import DistriConfig
from ..launch import init_local_rank
from .denoise import DenoiseRequest, load_unet_pipeline, run_denoise
from .faults import FaultInjection, describe_exit

DevicePlacement = Callable[[str, "int | None"], torch.device]
"""``(device, GPU index) -> torch.device``: the hook that puts a rank on its device (see
:func:`distrifusion.launch.select_device`, the default); called first thing in every rank."""


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker_main(
    rank: int,
    world: int,
    port: int,
    config: DistriConfig,
    model_directory: str,
    device_index: int | None,
    placement: DevicePlacement,
    threads: int | None,
    collective_timeout_s: float,
    backend: str | None,
    parent: int,
    commands: Any,
    replies: Any,
) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if threads is not None:
        torch.set_num_threads(threads)
    injection = FaultInjection()
    try:
        device = placement(config.device, device_index)
        injection.check_start(rank)
        # Before the rendezvous: rank 0 joins only once every rank got this far, so a rank that
        # cannot start does not leave it waiting in init_process_group for the whole timeout.
        replies.send(("placed", str(device)))
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        init_local_rank(rank, world, port, config.device, timeout=timeout, backend=backend)
        pipeline = load_unet_pipeline(model_directory, config, device)
        replies.send(("ready", str(device)))
    except Exception:
        replies.send(("failed", traceback.format_exc()))
        return
    while True:
        command, request = commands.recv()
        if command == "stop":
            break
        try:
            run_denoise(pipeline, request, on_step=lambda step, mark: injection.check_step(rank, step))
        except Exception:
            # The group is broken (its collectives are out of step): report, and leave it to rank 0.
            replies.send(("failed", traceback.format_exc()))
            os._exit(1)
    dist.destroy_process_group()


class RankWorker:
    """Rank 0's handle on one spawned rank: its process, its pipes, what it last said."""

    def __init__(
        self,
        rank: int,
        world: int,
        port: int,
        config: DistriConfig,
        model_directory: str,
        device_index: int | None,
        placement: DevicePlacement,
        threads: int | None,
        collective_timeout_s: float,
        backend: str | None = None,
    ) -> None:
        context = mp.get_context("spawn")
        command_reader, self._commands = context.Pipe(duplex=False)
        self._replies, reply_writer = context.Pipe(duplex=False)
        self.rank = rank
        self.device = "cpu" if device_index is None else f"cuda:{device_index}"
        self.process = context.Process(
            target=_worker_main,
            args=(rank, world, port, config, model_directory, device_index, placement, threads,
                  collective_timeout_s, backend, os.getpid(), command_reader, reply_writer),
            daemon=True,
            name=f"distrifusion-rank{rank}",
        )  # fmt: skip
        self.process.start()
        command_reader.close()
        reply_writer.close()
        self.ended_by_us = False
        self.failure: str | None = None
        """The traceback it reported, if any."""

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, command: str, request: DenoiseRequest | None = None) -> None:
        self._commands.send((command, request))

    def wait_for(self, wanted: str, seconds: float, stop: Callable[[], bool]) -> None:
        """Waits for its ``wanted`` report ("placed", then "ready"); raises naming the rank if it
        fails, dies or takes too long."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stop():
                raise RuntimeError(f"rank {self.rank}: start abandoned")
            if self._replies.poll(0.2):
                try:
                    status, detail = self._replies.recv()
                except EOFError:  # it died before saying anything
                    self.process.join(timeout=5)
                    raise RuntimeError(
                        f"rank {self.rank} ({self.device}) {describe_exit(self.process.exitcode)} while starting"
                    ) from None
                if status == wanted:
                    self.device = detail
                    return
                self.failure = detail
                raise RuntimeError(f"rank {self.rank} ({self.device}) failed to start:\n{detail}")
            if not self.alive:
                raise RuntimeError(
                    f"rank {self.rank} ({self.device}) {describe_exit(self.process.exitcode)} while starting"
                )
        raise RuntimeError(f"rank {self.rank} ({self.device}) did not start within {seconds:.0f} s")

    def cause_of_exit(self) -> tuple[str, str]:
        """(kind, cause) of an exit that was not ours: ``rank_raised`` with its error, or ``rank_exited``."""
        with contextlib.suppress(EOFError, OSError):
            while self._replies.poll():
                status, detail = self._replies.recv()
                if status == "failed":
                    self.failure = detail
        if self.failure:
            last = self.failure.strip().splitlines()[-1]
            return "rank_raised", f"raised {last}"
        return "rank_exited", describe_exit(self.process.exitcode)

    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP, a debugger): it holds its group up for good."""
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except (OSError, IndexError):
            return False

    def end(self) -> None:
        """Kills it (a stopped or wedged process too) and closes its pipes."""
        self.ended_by_us = True
        if self.alive:
            self.process.kill()
        self.process.join(timeout=10)
        for channel in (self._commands, self._replies):
            channel.close()

    def stop(self, seconds: float = 10.0) -> None:
        """Asks it to finish and leave; kills it if it does not within ``seconds``."""
        self.ended_by_us = True
        with contextlib.suppress(BrokenPipeError, OSError):
            self.send("stop")
        self.process.join(timeout=seconds)
        self.end()
