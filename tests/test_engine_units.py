"""Single-process tests: band layout, GroupNorm statistics, configuration and request errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_cases import EncodedImage, reference_outputs
from torch import nn

from distrifusion.config import ConfigError, DistriConfig, Mode
from distrifusion.context import PatchContext
from distrifusion.geometry import BandLayout, ModelGeometry
from distrifusion.ops import PatchGroupNorm
from distrifusion.ops.group_norm import corrected_moments, local_moments, merge_moments
from distrifusion.pipeline import DistriPipeline, StepProgress
from distrifusion.schedulers import SCHEDULERS


def test_uneven_bands_stay_aligned_at_every_level() -> None:
    layout = BandLayout.split(height=36, width=32, num_bands=2, levels=3)
    assert [layout.rows(band, 2) for band in range(2)] == [(0, 5), (5, 9)]
    assert [layout.rows(band, 0) for band in range(2)] == [(0, 20), (20, 36)]
    assert layout.max_band_height(1) == 10
    assert layout.level_of_width(8) == 2
    assert layout.level_of_tokens(1, 8 * 16) == 1


def test_three_bands_of_unequal_height() -> None:
    layout = BandLayout.split(height=32, width=32, num_bands=3, levels=3)
    assert [layout.band_height(band, 2) for band in range(3)] == [3, 3, 2]
    assert layout.rows(2, 0) == (24, 32)


def test_too_small_for_the_bands_names_the_smallest_valid_height() -> None:
    with pytest.raises(ConfigError, match=r"height: .*smallest valid height for 4 bands is 128 pixels"):
        BandLayout.split(height=8, width=8, num_bands=4, levels=3)


def test_size_must_divide_by_the_downsampling() -> None:
    with pytest.raises(ConfigError, match=r"width: must be a positive multiple of 32 pixels"):
        BandLayout.split(height=32, width=30, num_bands=2, levels=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "async_everything"}, r"mode: unknown mode 'async_everything'; allowed: full_sync, sync_gn"),
        ({"warmup_steps": -1}, r"warmup_steps: must be an integer >= 0"),
        ({"dtype": "fp8"}, r"dtype: unknown dtype 'fp8'; allowed: fp32, fp16, bf16"),
        ({"device": "tpu"}, r"device: must be 'cpu' or 'cuda'"),
        ({"cuda_graphs": True}, r"cuda_graphs: CUDA graphs need device='cuda'"),
        (
            {"compile": "yes"},
            r"compile: unknown torch.compile backend .yes.; allowed: true, false, aot_eager",
        ),
    ],
)
def test_invalid_configuration_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistriConfig(**kwargs)


def test_split_batch_needs_an_even_rank_count() -> None:
    config = DistriConfig(split_batch=True)
    config.validate_world(4)
    with pytest.raises(ConfigError, match=r"split_batch: needs an even number of ranks .* got 3"):
        config.validate_world(3)


def test_merged_moments_equal_the_whole_tensor() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 5) * 4 + torch.linspace(-100, 100, 8).view(1, 8, 1, 1)
    parts = [x[:, :, :7], x[:, :, 7:]]
    weights = torch.tensor([7 / 13, 6 / 13], dtype=torch.float64)
    mean, variance = merge_moments(torch.stack([local_moments(part, groups=4) for part in parts]), weights)
    expected_variance, expected_mean = torch.var_mean(x.double().reshape(2, 4, -1), dim=-1, correction=0)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-5, atol=0)


def test_correction_without_change_is_the_stale_global() -> None:
    torch.manual_seed(1)
    stale = torch.stack([local_moments(torch.randn(1, 8, 4, 4) + band, groups=2) for band in range(3)])
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    mean, variance = corrected_moments(stale, stale[1], weights - torch.tensor([0.0, 1.0, 0.0]).double())
    expected_mean, expected_variance = merge_moments(stale, weights)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(variance, expected_variance)


class _StaleMoments:
    """Stands in for an Exchange whose previous step left the given moments."""

    def __init__(self, stale: torch.Tensor) -> None:
        self.stale = stale

    def latest(self, key: str) -> torch.Tensor:
        return self.stale

    def send_buffer(self, key: str) -> None:
        return None

    def share_later(self, key: str, tensor: torch.Tensor) -> None:
        pass


def test_corrected_group_norm_never_uses_a_negative_variance() -> None:
    torch.manual_seed(2)
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 6)
    fresh = local_moments(x, 2)
    previous_own = fresh.clone()
    previous_own[0] -= 10  # this band's mean jumped by +10: the corrected E[x^2] - E[x]^2 goes negative
    stale = torch.stack([previous_own, fresh])
    _, variance = corrected_moments(stale, fresh, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert (variance < 0).all()

    layout = BandLayout.split(height=6, width=6, num_bands=2, levels=1)
    context = PatchContext(DistriConfig(mode=Mode.CORRECTED_ASYNC_GN, warmup_steps=0), layout=layout, band=0)
    context.exchange = _StaleMoments(stale)
    context.step = 1
    output = PatchGroupNorm(norm, context, "gn")(x)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, norm(x))  # fell back to this band's own exact statistics


def test_group_norm_retiles_its_affine_map_when_the_weights_change() -> None:
    torch.manual_seed(3)
    norm = nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 6)
    layout = BandLayout.split(height=6, width=6, num_bands=2, levels=1)
    context = PatchContext(DistriConfig(mode=Mode.SEPARATE_GN), layout=layout, band=0)
    patched = PatchGroupNorm(norm, context, "gn")
    own_statistics = nn.GroupNorm(2, 4)  # separate_gn: this band's statistics, the same affine map
    own_statistics.load_state_dict(norm.state_dict())
    torch.testing.assert_close(patched(x), own_statistics(x))
    with torch.no_grad():
        norm.weight.mul_(3)  # in place: the tiled copy must not be reused
        own_statistics.weight.mul_(3)
    torch.testing.assert_close(patched(x), own_statistics(x))
    norm.load_state_dict({"weight": torch.full((4,), 0.5), "bias": torch.ones(4)})
    own_statistics.load_state_dict(norm.state_dict())
    torch.testing.assert_close(patched(x), own_statistics(x))


@pytest.fixture(scope="module")
def single_rank_pipeline(tiny_sdxl_dir: Path) -> DistriPipeline:
    return DistriPipeline.from_pretrained(tiny_sdxl_dir, DistriConfig())


def test_the_geometry_read_from_the_configs_is_the_loaded_pipelines(
    tiny_sdxl_dir: Path, single_rank_pipeline: DistriPipeline
) -> None:
    # distrifusion-generate checks sizes with the configs alone, before any rank loads the model.
    assert ModelGeometry.read(tiny_sdxl_dir) == single_rank_pipeline.geometry
    assert single_rank_pipeline.geometry.default_size == 1024


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"height": 260}, r"height: must be a positive multiple of 8 pixels, got 260"),
        ({"height": 264}, r"height: must be a positive multiple of 32 pixels"),
        ({"width": 0}, r"width: must be a positive multiple of 8 pixels, got 0"),
        ({"num_inference_steps": 0}, r"num_inference_steps: must be an integer from 1 to 1000, got 0"),
        ({"num_inference_steps": 5000}, r"num_inference_steps: must be an integer from 1 to 1000"),
        ({"guidance_scale": math.nan}, r"guidance_scale: must be a finite number >= 0, got nan"),
        ({"guidance_scale": -1.0}, r"guidance_scale: must be a finite number >= 0"),
        ({"scheduler": "warp_drive"}, r"scheduler: unknown scheduler 'warp_drive'; allowed: ddim, euler"),
        (
            {"image": torch.zeros(1, 4, 32, 32), "strength": 0.0},
            r"strength: the share of the schedule to run, in \(0, 1\], got 0.0",
        ),
        ({"image": torch.zeros(1, 4, 32, 32), "strength": 1.5}, r"strength: .* got 1.5"),
        (
            {"image": torch.zeros(1, 4, 32, 16)},
            r"width: 256 differs from the image's 128 pixels; resize the image first",
        ),
    ],
)
def test_invalid_requests_are_named(
    single_rank_pipeline: DistriPipeline, request_fields: dict, message: str
) -> None:
    request = {"prompt": "a cat", "height": 256, "width": 256, "num_inference_steps": 2, **request_fields}
    with pytest.raises(ConfigError, match=message):
        single_rank_pipeline(**request)


def test_image_to_image_runs_the_steps_strength_selects_with_the_warmup_counted_from_the_first(
    tiny_sdxl_dir: Path,
) -> None:
    pipeline = DistriPipeline.from_pretrained(
        tiny_sdxl_dir, DistriConfig(mode="corrected_async_gn", warmup_steps=1)
    )
    latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    result = pipeline(
        prompt="a cat", image=latents, strength=0.5, num_inference_steps=8, seed=1, output_type="latent"
    )
    # 4 of 8 steps run: the first and one warm-up step synchronous, then the asynchronous ones.
    assert [record.phase for record in pipeline.unet.steps] == ["warmup", "warmup", "steady", "last"]
    assert result.latents.shape == latents.shape and not torch.equal(result.latents, latents)


def test_one_rank_returns_images_latents_and_the_seed(single_rank_pipeline: DistriPipeline) -> None:
    result = single_rank_pipeline(prompt="a cat", height=128, width=192, num_inference_steps=2)
    assert result.images[0].size == (192, 128)
    assert result.latents.shape == (1, 4, 16, 24)
    again = single_rank_pipeline(
        prompt="a cat", height=128, width=192, num_inference_steps=2, seed=result.seed
    )
    assert torch.equal(again.latents, result.latents)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_the_served_image_to_image_is_diffusers_for_every_scheduler(
    single_rank_pipeline: DistriPipeline, tiny_sdxl_dir: Path, scheduler: str
) -> None:
    """The encoder stage's posterior, sampled from the seed, against diffusers' img2img pipeline on
    the picture (it encodes and samples itself); and the steps the stream announces are the steps
    that run (Heun's second-order steps count twice)."""
    picture = EncodedImage(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    progress: list[StepProgress] = []
    call = {"prompt": "a cat", "strength": 0.5, "num_inference_steps": 6, "seed": 3, "scheduler": scheduler}
    result = single_rank_pipeline(
        image=picture.posterior(single_rank_pipeline.pipe.vae),
        output_type="latent",
        on_progress=progress.append,
        **call,
    )
    (expected,) = reference_outputs(str(tiny_sdxl_dir), [{**call, "image": picture}])
    torch.testing.assert_close(result.latents, expected, atol=1e-5, rtol=1e-5)
    announced = single_rank_pipeline.steps_run(6, scheduler, 0.5)
    assert [update.step for update in progress] == list(range(1, announced + 1))
    assert {update.total for update in progress} == {announced}
    progress.clear()
    single_rank_pipeline(
        prompt="a cat", height=64, width=96, num_inference_steps=6, seed=3, scheduler=scheduler,
        output_type="latent", on_progress=progress.append,
    )  # fmt: skip
    assert len(progress) == single_rank_pipeline.steps_run(6, scheduler) == progress[-1].total
