"""The VAE encoder stage without a server: its export against diffusers' posterior, the tiled
encode against the whole one, the resize and the refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from demo_model import SHIPPED
from distrifusion.export.specs import VAE_ENCODER_TILE_STATISTICS, VAE_ENCODER_TILES, VAE_ENCODER_WHOLE
from distrifusion.export.wrappers import VaeEncoderExport
from distrifusion.vae.decode import DEFAULT_IMAGE_STATISTICS, DecodeSettings, DecodeTooLarge
from distrifusion.vae.encode import VaeEncoder, resized
from distrifusion.vae.export import TileEncoderExport, TileEncoderStatisticsExport
from distrifusion.vae.footprint import DecoderFootprint

GIB = 2**30


@pytest.fixture(scope="module")
def vae(tiny_sdxl_dir: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae").eval()


def torch_encoder_engines(vae: AutoencoderKL):
    modules = {
        VAE_ENCODER_WHOLE: VaeEncoderExport(vae),
        VAE_ENCODER_TILE_STATISTICS: TileEncoderStatisticsExport(vae),
        VAE_ENCODER_TILES: TileEncoderExport(vae),
    }
    calls: list[str] = []

    def run(model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(model)
        with torch.no_grad():
            return modules[model](*inputs.values())

    return run, calls


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with edges: gradients and a few discs (what an encoder sees in practice)."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.stack([rows / height * 200, columns / width * 200, np.full((height, width), 90.0)], axis=-1)
    for _ in range(4):
        centre = rng.uniform(0, 1, 2) * (height, width)
        radius = rng.uniform(0.1, 0.3) * min(height, width)
        inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius**2
        image[inside] = rng.uniform(0, 255, 3)
    return image.clip(0, 255).astype(np.uint8)


def test_the_export_is_diffusers_posterior_in_the_unets_scale(vae: AutoencoderKL) -> None:
    image = picture(64, 96)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        moments = VaeEncoderExport(vae)(pixels)
        # diffusers' preprocessing (VaeImageProcessor: /255, then 2x - 1) and its posterior.
        posterior = vae.encode(pixels / 255 * 2 - 1).latent_dist
    channels = vae.config.latent_channels
    assert moments.shape == (1, 2 * channels, 8, 12)
    scale = vae.config.scaling_factor
    torch.testing.assert_close(moments[:, :channels], posterior.mean * scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moments[:, channels:], posterior.std * scale, atol=1e-5, rtol=1e-5)


def test_the_footprint_counts_the_encoders_norms(vae: AutoencoderKL) -> None:
    footprint = DecoderFootprint.from_config(vae.config)
    assert footprint.encoder_norm_layers == sum(isinstance(m, nn.GroupNorm) for m in vae.encoder.modules())
    assert TileEncoderExport(vae).layers == footprint.encoder_norm_layers


def test_one_tile_with_image_statistics_is_the_whole_encode(vae: AutoencoderKL) -> None:
    image = picture(192, 320)
    run, _ = torch_encoder_engines(vae)
    whole = run(VAE_ENCODER_WHOLE, {"pixels": torch.from_numpy(image).permute(2, 0, 1)[None].float()})[0]
    settings = DecodeSettings.derive(
        vae.config, 8 * GIB, tensorrt=False, tile=40, whole_max_pixels=1, image_statistics=1.0
    )
    moments, record = VaeEncoder(settings, run).encode(image, 192, 320)
    assert record.tiles == 1 and record.engine_calls == 2
    torch.testing.assert_close(moments, whole, atol=2e-4, rtol=1e-4)


def test_a_tiled_encode_with_image_statistics_is_close_to_the_whole_encode() -> None:
    # The demo model's trained VAE: a random one's posterior barely depends on the picture.
    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", torch_dtype=torch.float32).eval()
    image = picture(256, 384, seed=3)
    run, calls = torch_encoder_engines(vae)
    whole, record = VaeEncoder(DecodeSettings.derive(vae.config, 8 * GIB, tensorrt=False), run).encode(
        image, 256, 384
    )
    assert record.tiles == 0 and calls == [VAE_ENCODER_WHOLE]
    channels = vae.config.latent_channels
    errors = {}
    for share in (0.0, DEFAULT_IMAGE_STATISTICS):
        settings = DecodeSettings.derive(
            vae.config,
            8 * GIB,
            tensorrt=False,
            tile=16,
            overlap=4,
            tiles_per_call=3,
            whole_max_pixels=1,
            image_statistics=share,
        )
        calls.clear()
        tiled, record = VaeEncoder(settings, run).encode(image, 256, 384)
        assert record.tiles == len(settings.plan(32, 48)) == 12
        assert calls.count(VAE_ENCODER_TILES) == 4
        assert calls.count(VAE_ENCODER_TILE_STATISTICS) == (4 if share else 0)
        # The posterior's mean is what the UNet starts from.
        errors[share] = (tiled[:channels] - whole[:channels]).abs().mean() / whole[:channels].std()
    # Measured: 0.20 of the latents' spread with each tile's own statistics, 0.084 shared.
    assert errors[DEFAULT_IMAGE_STATISTICS] < 0.1 < errors[0.0], errors


def test_an_image_of_another_size_is_resized_with_lanczos(vae: AutoencoderKL) -> None:
    image = picture(100, 150)
    run, _ = torch_encoder_engines(vae)
    settings = DecodeSettings.derive(vae.config, 8 * GIB, tensorrt=False)
    moments, _ = VaeEncoder(settings, run).encode(image, 128, 192)
    assert moments.shape[-2:] == (16, 24)
    expected, _ = VaeEncoder(settings, run).encode(resized(image, 128, 192), 128, 192)
    torch.testing.assert_close(moments, expected)
    assert resized(image, 100, 150) is image


def test_an_image_beyond_the_budget_is_refused_naming_the_encoder(vae: AutoencoderKL) -> None:
    settings = DecodeSettings.derive(vae.config, GIB // 2, tensorrt=False, tile=16)
    run, calls = torch_encoder_engines(vae)
    with pytest.raises(
        DecodeTooLarge, match=r"vae_encoder: a 8192x8192 image needs about .* to encode even in tiles"
    ):
        VaeEncoder(settings, run).encode(picture(64, 64), 8192, 8192)
    assert calls == []
