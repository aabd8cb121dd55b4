"""Forming the process group: under torchrun, or by spawning N local ranks from one process."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def default_backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def select_device(device: str, index: int | None) -> torch.device:
    """The engine's device hook: makes GPU ``index`` this process's current device (CUDA), or the CPU.

    ``index`` counts the GPUs this process sees, so an outer ``CUDA_VISIBLE_DEVICES`` is honoured;
    nothing here depends on whether CUDA was already initialised in the process (importing
    diffusers enumerates the devices).
    """
    if device != "cuda":
        return torch.device("cpu")
    if index is None:
        raise ValueError("select_device: a CUDA rank needs a GPU index")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@dataclasses.dataclass(frozen=True)
class ExactFp32:
    """A device hook that turns TF32 off in its rank's process, then places the rank with
    ``placement``: cuDNN convolutions use TF32 for fp32 by default on Ampere and later, so fp32
    results compared across processes agree to TF32's 1e-3 instead of rounding's 1e-6. For tests and
    exactness checks, as a group's placement hook, which every rank runs (spawned ones too; a
    setting made in the calling process would not reach them)."""

    placement: Callable[[str, int | None], torch.device] = select_device

    def __call__(self, device: str, index: int | None) -> torch.device:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self.placement(device, index)


def init_from_environment(device: str) -> None:
    """Joins the group torchrun describes; on CUDA each rank takes the GPU of its local rank."""
    select_device(device, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(default_backend(device))


def init_local_rank(
    rank: int,
    world_size: int,
    port: int,
    device: str,
    timeout: datetime.timedelta | None = None,
    backend: str | None = None,
) -> None:
    """Joins a group of ``world_size`` processes on this machine, rendezvous on 127.0.0.1:``port``,
    with ``backend`` (None: NCCL for CUDA, gloo for the CPU).

    The device must be selected first (:func:`select_device`).
    """
    dist.init_process_group(
        backend or default_backend(device),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    device: str,
    threads: int | None,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        select_device(device, rank)
        init_local_rank(rank, world_size, port, device)
        result = fn(*args)
        # Plain pickle copies tensors by value; torch's queue pickler would pass shared-memory
        # handles that die with this process.
        results.put((rank, True, pickle.dumps(result if rank == 0 else None)))
    except Exception as error:
        error.add_note(f"raised on rank {rank} of {world_size}:\n{traceback.format_exc()}")
        try:
            payload = pickle.dumps(error)
        except Exception:
            payload = pickle.dumps(
                RuntimeError(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}")
            )
        results.put((rank, False, payload))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    device: str = "cpu",
    threads_per_rank: int | None = None,
) -> Any:
    """Runs ``fn(*args)`` on ``world_size`` fresh local ranks in one process group; returns rank 0's result.

    ``fn`` must be importable (spawned processes re-import it). The first exception raised on a rank
    is raised here again, with that rank's traceback as a note.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, port, device, threads_per_rank, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    break
                continue
            outcomes[rank] = (ok, pickle.loads(value))
            if not ok:
                break
    finally:
        for process in processes:
            process.join(timeout=10 if len(outcomes) == world_size else 1)
            if process.is_alive():
                process.terminate()
    failures = [error for ok, error in outcomes.values() if not ok]
    if failures:
        raise failures[0]
    if len(outcomes) < world_size:
        codes = [p.exitcode for p in processes]
        raise RuntimeError(f"a rank exited without a result (exit codes {codes})")
    return outcomes[0][1]
