"""What the GPU tests share: SDXL-structured UNets built on the GPU, their inputs, and collectives
that stand in for other GPUs on a one-GPU machine."""

from __future__ import annotations

import dataclasses
import json
import threading
import types
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from distrifusion.config import DistriConfig
from distrifusion.launch import ExactFp32
from distrifusion.serving.denoise import DenoiseRequest, load_unet_pipeline, run_denoise, warmup_request
from distrifusion.serving.unet_group import UNetGroup
from distrifusion.tiny_model import SDXL_SCHEDULER_CONFIG, sdxl_unet_config

# Wider than the CPU tests' UNet so that fp16 rounding and kernel choices are those of real
# layers, small enough to build in a second.
UNET_CONFIG = sdxl_unet_config(
    block_out_channels=(64, 128, 256), cross_attention_dim=128, pooled_projection_dim=64
)
TEXT_TOKENS = 77


def build_unet(dtype: torch.dtype, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def unet_inputs(dtype: torch.dtype, batch: int = 2, height: int = 64, width: int = 64, seed: int = 0) -> dict:
    generator = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to("cuda", dtype)

    pooled = UNET_CONFIG["projection_class_embeddings_input_dim"] - 6 * UNET_CONFIG["addition_time_embed_dim"]
    size = [height * 8, width * 8]
    return {
        "sample": randn(batch, 4, height, width),
        "timestep": torch.tensor(500.0, device="cuda"),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, UNET_CONFIG["cross_attention_dim"]),
        "added_cond_kwargs": {
            "text_embeds": randn(batch, pooled),
            "time_ids": torch.tensor([[*size, 0, 0, *size]] * batch, device="cuda", dtype=dtype),
        },
    }


def call(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0].clone()


def denoise_request(steps: int = 8, height: int = 512, width: int = 512) -> DenoiseRequest:
    """One prompt of random embeddings (zeros could hide a mix-up), seed 5, guidance 5."""
    generator = torch.Generator().manual_seed(3)
    request = warmup_request(types.SimpleNamespace(**UNET_CONFIG), height, width, TEXT_TOKENS, steps)
    return dataclasses.replace(
        request,
        prompt_embeds=torch.randn(request.prompt_embeds.shape, generator=generator),
        pooled_prompt_embeds=torch.randn(request.pooled_prompt_embeds.shape, generator=generator),
        seeds=[5],
        compile_new_shape=False,
    )


def full_sync_error(model_dir: Path, devices: list[int], backend: str | None = None) -> float:
    """Relative error of a full_sync fp32 group on ``devices`` against one rank on GPU 0, TF32 off
    in every rank."""
    config = DistriConfig(mode="full_sync", dtype="fp32", device="cuda", cuda_graphs=False)
    single = run_denoise(
        load_unet_pipeline(str(model_dir), config, ExactFp32()("cuda", 0)), denoise_request()
    )
    group = UNetGroup(
        str(model_dir), config, ranks=len(devices), devices=devices, backend=backend, placement=ExactFp32()
    )
    try:
        assert group.devices == [f"cuda:{index}" for index in devices]
        return relative_error(group.denoise(denoise_request()).latents, single.latents)
    finally:
        group.close()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def save_unet_only(directory: Path, seed: int = 0) -> Path:
    """A diffusers directory as build_engines gives the UNet stage: unet/ and scheduler/ only."""
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(directory / "unet")
    EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        **{
            name: [None, None]
            for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        },
    }
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


class _Done:
    def wait(self) -> bool:
        return True


class ThreadRanks:
    """``world`` ranks as threads of this process on one GPU; all-gathers meet at a barrier.

    Every thread queues its kernels on the same (default) stream, so a copy queued after the
    barrier runs after the kernels that produced its source.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self._inputs: list[torch.Tensor | None] = [None] * world
        self._barrier = threading.Barrier(world, timeout=120)

    def collective(self, rank: int) -> Any:
        ranks = self

        class _Member:
            def all_gather(
                self, output: torch.Tensor, input: torch.Tensor, group: Any, async_op: bool
            ) -> Any:
                ranks._inputs[rank] = input.reshape(-1)
                ranks._barrier.wait()
                for source, slot in zip(ranks._inputs, output.view(ranks.world, -1), strict=True):
                    slot.copy_(source)
                ranks._barrier.wait()
                return _Done() if async_op else None

        return _Member()

    def run(self, work: Any) -> list[Any]:
        """``work(rank)`` on every rank at once; returns the results in rank order."""
        results: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(rank)
            except BaseException as error:
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results
