"""Step previews through a linear latent-to-RGB map (distrifusion.vae.preview): the fit, the stored
and published maps, and how close the demo model's map comes to its VAE's decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from demo_model import SHIPPED
from distrifusion.vae.preview import MAP_FILE, SDXL_SCALING_FACTOR, LatentToRgb

# Measured 18.0 dB on these 16 scenes (the map fitted on 64 others); SDXL's published map on this
# VAE gives 4.0 dB: a map of the wrong VAE fails.
MIN_PREVIEW_PSNR_DB = 15.0


def test_the_fit_recovers_a_linear_decoder_exactly() -> None:
    true = torch.tensor(
        [[0.3, -0.1, 0.2], [0.0, 0.5, -0.4], [-0.2, 0.1, 0.3], [0.1, 0.1, 0.1]], dtype=torch.float64
    )
    bias = torch.tensor([0.05, -0.02, 0.1], dtype=torch.float64)

    def decode(latents: torch.Tensor) -> torch.Tensor:  # linear per pixel, then 8x larger
        mapped = torch.einsum("bchw,cr->brhw", latents.double(), true) + bias[None, :, None, None]
        return F.interpolate(mapped, scale_factor=8, mode="nearest")

    fitted = LatentToRgb.fit(
        decode, torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(0)), scale=8
    )
    assert np.allclose(fitted.weights, true.numpy(), atol=1e-9) and np.allclose(
        fitted.bias, bias.numpy(), atol=1e-9
    )


def test_a_vae_gets_its_stored_map_else_sdxls_published_one_else_a_named_error(tmp_path: Path) -> None:
    sdxl = {"latent_channels": 4, "scaling_factor": SDXL_SCALING_FACTOR}
    assert LatentToRgb.for_vae(tmp_path, sdxl) == LatentToRgb.sdxl()
    with pytest.raises(FileNotFoundError, match=f"not SDXL's VAE and no {MAP_FILE}"):
        LatentToRgb.for_vae(tmp_path, {"latent_channels": 4, "scaling_factor": 0.5})
    stored = LatentToRgb(weights=((0.1, 0.2, 0.3),) * 4, bias=(0.0, 0.1, -0.1))
    stored.save(tmp_path)
    assert LatentToRgb.for_vae(tmp_path, sdxl) == stored  # a stored map wins, even for SDXL's VAE
    assert json.loads((tmp_path / MAP_FILE).read_text())["bias"] == [0.0, 0.1, -0.1]


def test_a_preview_keeps_the_aspect_ratio_at_the_size_asked_for() -> None:
    preview = LatentToRgb.sdxl().preview(torch.zeros(2, 4, 16, 32), longer_side=256)
    assert preview.shape == (2, 128, 256, 3) and preview.dtype == np.uint8
    # A zero latent is the bias's colour everywhere: ((bias + 1) / 2) * 255.
    expected = np.round((np.array(LatentToRgb.sdxl().bias) + 1) / 2 * 255)
    assert np.array_equal(preview[0, 64, 128], expected.astype(np.uint8))
    assert LatentToRgb.sdxl().preview(torch.zeros(1, 4, 3, 200), longer_side=64).shape == (1, 1, 64, 3)


@pytest.mark.slow
def test_the_shipped_models_map_is_close_to_its_vae_on_scenes_it_was_not_fitted_on() -> None:
    """The stored map, against the VAE's decode pooled to one pixel per latent pixel, on scenes of
    seeds the fit did not use: a preview shows the picture's colours where they are."""
    from diffusers import AutoencoderKL

    from demo_model.preview_map import FIT_SCENES, encoded_scenes

    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", dtype=torch.float32).eval()
    mapping = LatentToRgb.for_vae(SHIPPED / "vae", dict(vae.config))
    latents = encoded_scenes(vae, range(FIT_SCENES, FIT_SCENES + 16), 256)
    with torch.no_grad():
        decoded = F.avg_pool2d((vae.decode(latents / vae.config.scaling_factor).sample + 1) / 2, 8).clamp(
            0, 1
        )
    error = (mapping.rgb(latents) - decoded).pow(2).mean().item()
    psnr = 10 * np.log10(1 / error)
    print(f"preview against the pooled decode: {psnr:.1f} dB")
    assert psnr > MIN_PREVIEW_PSNR_DB, psnr
