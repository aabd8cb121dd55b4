"""The VAE stage at high resolution, without a server: the cost model against the decoder it
describes, the tile plan, the shared GroupNorm statistics, and the tiled decode against the whole
decode and against diffusers' own tiling."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from distrifusion.export.wrappers import VaeDecoderExport
from distrifusion.serving.vae_stage import VaeStage
from distrifusion.vae.decode import (
    TILE_ENGINE,
    TILE_STATISTICS_ENGINE,
    WHOLE_ENGINE,
    DecodeSettings,
    DecodeTooLarge,
    EngineOutputError,
    VaeDecoder,
)
from distrifusion.vae.export import TileDecoderExport, TileStatisticsExport
from distrifusion.vae.footprint import DecoderFootprint
from distrifusion.vae.quality import (
    diffusers_tile_borders,
    diffusers_tiled_decode,
    psnr,
    seam_score,
    structured_latents,
    tile_borders,
)
from distrifusion.vae.tiles import TilePlan

SDXL_VAE = {  # the released SDXL VAE's config, the parts the cost model reads
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "latent_channels": 4,
}
GIB = 2**30


@pytest.fixture(scope="module")
def vae(tiny_sdxl_dir: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae").eval()


def torch_engines(vae: AutoencoderKL):
    whole, statistics, tiles = VaeDecoderExport(vae), TileStatisticsExport(vae), TileDecoderExport(vae)
    modules = {WHOLE_ENGINE: whole, TILE_STATISTICS_ENGINE: statistics, TILE_ENGINE: tiles}

    def run(model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return modules[model](*inputs.values())

    return run


def test_the_footprint_matches_the_decoder_it_describes(vae: AutoencoderKL) -> None:
    footprint = DecoderFootprint.from_config(vae.config)
    largest = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal largest
        for tensor in (*inputs, output):
            if isinstance(tensor, torch.Tensor):
                largest = max(largest, tensor.numel())

    handles = [module.register_forward_hook(hook) for module in vae.decoder.modules()]
    with torch.no_grad():
        vae.decoder(torch.zeros(1, 4, 6, 10))
    for handle in handles:
        handle.remove()
    assert largest == footprint.largest_tensor_elements(1, 6, 10)
    assert footprint.norm_layers == sum(isinstance(m, nn.GroupNorm) for m in vae.decoder.modules())
    assert footprint.scale_factor == 8 and footprint.norm_groups == vae.config.norm_num_groups
    sdxl = DecoderFootprint.from_config(SDXL_VAE)
    assert sdxl.largest_elements_per_latent_pixel == 256 * 8 * 8  # up_blocks[2]'s upsampled output
    side = math.isqrt((2**31 - 1) // 256)
    assert side == 2896  # one SDXL image passes TensorRT's element limit just above 2896 x 2896
    assert sdxl.norm_layers == 30


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"), [(40, 72, 16, 4), (16, 100, 32, 8), (33, 33, 32, 31)]
)
def test_tiles_cover_the_latent_and_their_weights_sum_to_one(height, width, tile, overlap) -> None:
    plan = TilePlan.for_latent(height, width, tile, overlap, scale=2)
    coverage = np.zeros((height * 2, width * 2))
    for index in range(len(plan)):
        coverage[plan.pixels(index)] += plan.pixel_weights[index]
    np.testing.assert_allclose(coverage, 1.0, rtol=1e-6)
    for starts, length, size in (
        (plan.rows, height, plan.tile_height),
        (plan.columns, width, plan.tile_width),
    ):
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(b - a <= size - min(overlap, size - 1) for a, b in itertools.pairwise(starts))
    latent = plan.latent_weights(range(len(plan)))
    total = torch.zeros(height, width)
    for index, (row, column) in enumerate(plan.origins):
        total[row : row + plan.tile_height, column : column + plan.tile_width] += torch.from_numpy(
            latent[index, 0]
        )
    torch.testing.assert_close(total, torch.ones(height, width))


def test_one_tile_over_the_whole_latent_with_image_statistics_is_the_whole_decode(vae) -> None:
    latents = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(0))
    run = torch_engines(vae)
    whole = run(WHOLE_ENGINE, {"latents": latents[None]})[0]
    settings = DecodeSettings.derive(
        vae.config, 8 * GIB, tensorrt=False, tile=40, whole_max_pixels=1, image_statistics=1.0
    )
    image, record = VaeDecoder(settings, run).decode(latents)
    assert record.path == "tiled" and record.tiles == 1
    assert (image.int() - whole.int()).abs().max() <= 1


def test_tiled_decode_beats_diffusers_tiling_at_the_same_tile_size(vae) -> None:
    """512 x 512 in tiles of 256 px: PSNR against the whole decode and the seam score, on random
    latents and on the encoder's latents of a structured picture."""
    run = torch_engines(vae)
    tile = 32
    settings = DecodeSettings.derive(vae.config, 8 * GIB, tensorrt=False, tile=tile, whole_max_pixels=1)
    for name, latents in {
        "random": torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)),
        "picture": structured_latents(vae, 512),
    }.items():
        whole = run(WHOLE_ENGINE, {"latents": latents[None]})[0].numpy()
        ours, record = VaeDecoder(settings, run).decode(latents)
        theirs = diffusers_tiled_decode(vae, latents, tile * 8)
        plan = settings.plan(64, 64)
        assert record.tiles == len(plan) == 9
        ours_psnr, theirs_psnr = psnr(ours.numpy(), whole), psnr(theirs, whole)
        assert ours_psnr > theirs_psnr, f"{name}: {ours_psnr:.2f} dB vs diffusers' {theirs_psnr:.2f} dB"
        ours_borders = tile_borders([row * 8 for row in plan.rows], plan.tile_height * 8)
        their_borders = diffusers_tile_borders(64, tile * 8, 8)
        ours_seams = seam_score(ours.numpy(), whole, ours_borders, ours_borders)
        their_seams = seam_score(theirs, whole, their_borders, their_borders)
        assert 0.9 < ours_seams < their_seams, (
            f"{name}: seam score {ours_seams:.3f} vs diffusers' {their_seams:.3f}"
        )


@pytest.mark.parametrize("tiled", [False, True])
def test_an_engine_output_on_another_device_is_brought_back_or_named(vae, tiled: bool) -> None:
    """A BLS output stays on the device its engine ran on (a TensorRT engine's GPU): mixing it with
    the stage's CPU tensors failed every tiled decode. ``meta`` stands for a device whose memory
    cannot be read here: the error names the engine and the device; a readable one is copied."""
    settings = DecodeSettings.derive(
        vae.config, GIB, tensorrt=False, tile=16, whole_max_pixels=None if not tiled else 1
    )
    latents = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(0))
    run = torch_engines(vae)
    expected, _ = VaeDecoder(settings, run).decode(latents)

    def on_device(device: str):
        def engine(model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return run(model, inputs).to(device)

        return engine

    image, _ = VaeDecoder(settings, on_device("cpu")).decode(latents)
    assert torch.equal(image, expected)
    engine = TILE_STATISTICS_ENGINE if tiled else WHOLE_ENGINE
    with pytest.raises(
        EngineOutputError, match=rf"{engine} returned its output on meta, which cannot be copied to cpu"
    ):
        VaeDecoder(settings, on_device("meta")).decode(latents)


def test_settings_pick_whole_or_tiles_and_refuse_what_cannot_fit() -> None:
    gpu = DecodeSettings.derive(SDXL_VAE, 24 * GIB, tensorrt=True)
    assert gpu.tile == 128 and gpu.overlap == 32
    assert gpu.tiles_per_call == 1  # a 1024 px tile's record pass: about 9.8 GiB with its scores
    assert gpu.decodes_whole(128, 128)  # 1024^2: 6 GiB of activations, 2 GiB of scores
    assert not gpu.decodes_whole(256, 256)  # 2048^2: the score matrix alone has 4.3e9 elements
    assert gpu.check(480, 480) is False  # 3840^2 in tiles
    assert gpu.check(512, 512) is False  # 4096^2 in tiles
    small = DecodeSettings.derive(SDXL_VAE, int(9.9 * GIB), tensorrt=True, tiles_per_call=1)
    with pytest.raises(
        DecodeTooLarge, match=r"a 4096x4096 image needs about .* the largest square image that fits is"
    ):
        small.check(512, 512)
    forced = DecodeSettings.derive(SDXL_VAE, 24 * GIB, tensorrt=True, whole_max_pixels=512 * 512)
    assert forced.decodes_whole(64, 64) and not forced.decodes_whole(64, 72)
    with pytest.raises(ValueError, match="tile overlap"):
        DecodeSettings.derive(SDXL_VAE, 24 * GIB, tensorrt=True, overlap=128)
    with pytest.raises(ValueError, match=r"1 tile.* per call of vae_decoder_tile_statistics need 9.8 GiB"):
        DecodeSettings.derive(SDXL_VAE, 8 * GIB, tensorrt=True)
    cpu = DecodeSettings.derive(SDXL_VAE, 16 * GIB, tensorrt=False)  # attention fused: no scores
    assert cpu.decodes_whole(200, 200) and not cpu.decodes_whole(256, 256)  # 1600^2 whole, 2048^2 tiled


def test_the_stage_refuses_a_size_beyond_its_budget_before_any_engine_call(vae) -> None:
    settings = DecodeSettings.derive(vae.config, 320 * 2**20, tensorrt=False, tile=16, tiles_per_call=1)
    calls = []
    stage = VaeStage(settings, lambda model, inputs: calls.append(model))
    with pytest.raises(DecodeTooLarge, match=r"vae_decoder: a 4096x4096 image needs about .* GiB"):
        stage.decode(np.zeros((1, 4, 512, 512), np.float32))
    assert calls == []
    images, records = VaeStage(settings, torch_engines(vae)).decode(np.zeros((2, 4, 24, 40), np.float32))
    assert images.shape == (2, 192, 320, 3) and images.dtype == np.uint8
    assert [record.path for record in records] == ["whole", "whole"]  # ~300 MiB each (256: overhead)
