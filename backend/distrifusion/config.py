"""Configuration of a patch-parallel run: which parallelism, which approximations, which device."""

from __future__ import annotations

import dataclasses
import enum
import math

import torch


class Mode(enum.StrEnum):
    """How stale activations and GroupNorm statistics are used after the warm-up steps.

    The names are the DistriFusion reference's, so results can be compared with the paper.
    """

    FULL_SYNC = "full_sync"
    """Everything exchanged fresh at every step: exact, no overlap of communication."""
    SYNC_GN = "sync_gn"
    """Stale halos and keys/values, GroupNorm statistics exact (synchronous)."""
    CORRECTED_ASYNC_GN = "corrected_async_gn"
    """Stale halos and keys/values, GroupNorm statistics stale plus this band's change (paper Eq. 2)."""
    STALE_GN = "stale_gn"
    """Stale halos and keys/values, GroupNorm statistics of the other bands from the previous step."""
    SEPARATE_GN = "separate_gn"
    """Stale halos and keys/values, GroupNorm statistics of the local band only."""
    NAIVE_PATCH = "naive_patch"
    """Baseline: bands never interact (zero padding at band edges, local attention and statistics)."""


MAX_INFERENCE_STEPS = 1000

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A configuration or request that cannot run; the message names the field and what is allowed."""


def check_sampling(num_inference_steps: int, guidance_scale: float) -> None:
    """Raises ConfigError when a request's step count or guidance scale cannot run on any model."""
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
        raise ConfigError(
            f"num_inference_steps: must be an integer from 1 to {MAX_INFERENCE_STEPS}, got {num_inference_steps!r}"
        )
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale: must be a finite number >= 0, got {guidance_scale!r}")


@dataclasses.dataclass(frozen=True)
class DistriConfig:
    """How one patch-parallel group runs.

    Attributes:
        mode: one of :class:`Mode` (a string is accepted).
        warmup_steps: synchronous steps after the first one (the first step is always synchronous).
        split_batch: with classifier-free guidance and an even number of ranks, half of the ranks
            denoise the unconditional batch and half the conditional one.
        dtype: "fp32", "fp16" or "bf16" (None: fp16 on CUDA, fp32 on the CPU).
        device: "cpu" or "cuda"; on CUDA each rank uses its current device.
        comm_batch_size: how many exchanged tensors share one asynchronous all-gather.
        cuda_graphs: capture the warm-up, steady and last steps as CUDA graphs (None: on for CUDA,
            where eager band steps are bound by kernel launches; CUDA only).
        compile: compile each band's UNet with ``torch.compile``, one graph per input shape; combines
            with ``cuda_graphs``. True means "inductor" (C++ on the CPU, Triton kernels on CUDA);
            another backend name is passed on ("aot_eager": dynamo's graph run by PyTorch's own
            kernels, the compiled engine's logic in seconds instead of inductor's minutes).
    """

    mode: Mode | str = Mode.CORRECTED_ASYNC_GN
    warmup_steps: int = 4
    split_batch: bool = False
    dtype: str | None = None
    device: str = "cpu"
    comm_batch_size: int = 60
    cuda_graphs: bool | None = None
    compile: bool | str = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            allowed = ", ".join(m.value for m in Mode)
            raise ConfigError(f"mode: unknown mode {self.mode!r}; allowed: {allowed}") from None
        if not _is_integer(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: must be 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype is None:
            object.__setattr__(self, "dtype", "fp16" if self.device == "cuda" else "fp32")
        if self.cuda_graphs is None:
            object.__setattr__(self, "cuda_graphs", self.device == "cuda")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if not isinstance(self.split_batch, bool):
            raise ConfigError(f"split_batch: must be true or false, got {self.split_batch!r}")
        if not _is_integer(self.comm_batch_size) or self.comm_batch_size < 1:
            raise ConfigError(f"comm_batch_size: must be an integer >= 1, got {self.comm_batch_size!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs: must be true or false, got {self.cuda_graphs!r}")
        if self.compile is True:
            object.__setattr__(self, "compile", "inductor")
        if isinstance(self.compile, str):
            import torch._dynamo  # only for a compiled engine: its import takes a second

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in backends:
                raise ConfigError(
                    f"compile: unknown torch.compile backend {self.compile!r}; allowed: true, false, "
                    + ", ".join(backends)
                )
        elif self.compile is not False:
            raise ConfigError(
                f"compile: must be true, false or a torch.compile backend, got {self.compile!r}"
            )
        if self.cuda_graphs and self.device != "cuda":
            raise ConfigError("cuda_graphs: CUDA graphs need device='cuda'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def validate_world(self, world_size: int) -> None:
        """Checks what depends on the number of ranks."""
        if world_size < 1:
            raise ConfigError(f"ranks: need at least 1 rank, got {world_size}")
        if self.split_batch and world_size % 2:
            raise ConfigError(
                f"split_batch: needs an even number of ranks (half per guidance branch), got {world_size}"
            )
