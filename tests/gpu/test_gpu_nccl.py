"""The served UNet group on several GPUs with NCCL (skipped with fewer than two): every rank on its
own GPU, full_sync equal to one GPU, the production settings (fp16, CUDA graphs, asynchronous)
finite, warm-up at load and replay of its graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ranks import TEXT_TOKENS, UNET_CONFIG, save_unet_only

from distrifusion.config import DistriConfig
from distrifusion.serving.denoise import DenoiseRequest, load_unet_pipeline, run_denoise
from distrifusion.serving.unet_group import UNetGroup

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_unet_only(tmp_path_factory.mktemp("unet-only"))


def request(steps: int = 8) -> DenoiseRequest:
    generator = torch.Generator().manual_seed(3)
    pooled = UNET_CONFIG["projection_class_embeddings_input_dim"] - 6 * UNET_CONFIG["addition_time_embed_dim"]
    embeds = torch.randn(1, TEXT_TOKENS, UNET_CONFIG["cross_attention_dim"], generator=generator)
    return DenoiseRequest(
        prompt_embeds=embeds,
        pooled_prompt_embeds=torch.randn(1, pooled, generator=generator),
        negative_prompt_embeds=torch.zeros_like(embeds),
        negative_pooled_prompt_embeds=torch.zeros(1, pooled),
        seeds=[5],
        height=512,
        width=512,
        num_inference_steps=steps,
        guidance_scale=5.0,
    )


def test_full_sync_on_two_gpus_equals_one_gpu(model_dir: Path) -> None:
    config = DistriConfig(mode="full_sync", dtype="fp32", device="cuda", cuda_graphs=False)
    torch.cuda.set_device(0)
    single = run_denoise(load_unet_pipeline(str(model_dir), config, torch.device("cuda", 0)), request())
    group = UNetGroup(str(model_dir), config, ranks=2, devices=[0, 1])
    try:
        assert group.devices == ["cuda:0", "cuda:1"]
        result = group.denoise(request())
    finally:
        group.close()
    error = ((result.latents - single.latents).norm() / single.latents.norm()).item()
    assert error <= 1e-4, error


def test_production_settings_on_every_gpu(model_dir: Path) -> None:
    count = torch.cuda.device_count()
    config = DistriConfig(device="cuda")  # fp16, CUDA graphs, corrected_async_gn
    assert config.cuda_graphs and config.dtype == "fp16"
    group = UNetGroup(str(model_dir), config, ranks=count, devices=list(range(count)))
    try:
        assert group.devices == [f"cuda:{index}" for index in range(count)]
        group.warm_up(512, 512, TEXT_TOKENS)
        captured = group.pipeline.unet.graphs.captures
        first = group.denoise(request(steps=12))
        again = group.denoise(request(steps=12))
        assert group.pipeline.unet.graphs.captures == captured, "the warm-up captured every phase"
        assert torch.isfinite(first.latents).all()
        assert torch.equal(first.latents, again.latents)
        steady = [s for s in group.pipeline.unet.steps if s.phase == "steady"]
        assert steady and all(s.communication.bytes_sent > 0 for s in steady)
    finally:
        group.close()
