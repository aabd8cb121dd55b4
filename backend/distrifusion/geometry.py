"""How the latent is cut into horizontal bands, one per rank, consistently at every UNet level."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ConfigError


@dataclasses.dataclass(frozen=True)
class BandLayout:
    """Row ranges of each band at each resolution level of the UNet.

    Bands are cut at the deepest level (as evenly as possible, the first bands one row taller when
    the rows do not divide) and scaled up by 2 per level, so a stride-2 convolution maps a band at
    one level exactly onto the same band one level down, and a 2x upsampling the other way.
    """

    height: int
    width: int
    levels: int
    deep_bounds: tuple[int, ...]

    @classmethod
    def split(
        cls, height: int, width: int, num_bands: int, levels: int, pixels_per_latent: int = 8
    ) -> BandLayout:
        """Cuts a latent of ``height`` x ``width`` into ``num_bands`` bands.

        ``levels`` is the number of resolutions in the UNet (downsamplings + 1);
        ``pixels_per_latent`` only turns the error messages into image pixels.
        """
        factor = 2 ** (levels - 1)
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % factor:
                raise ConfigError(
                    f"{name}: must be a positive multiple of {factor * pixels_per_latent} pixels for this "
                    f"UNet ({levels - 1} downsamplings), got {size * pixels_per_latent}"
                )
        deep_rows = height // factor
        if deep_rows < num_bands:
            smallest = num_bands * factor * pixels_per_latent
            raise ConfigError(
                f"height: {height * pixels_per_latent} pixels leaves {deep_rows} rows at the deepest UNet "
                f"level, fewer than the {num_bands} bands of the patch group; the smallest valid height "
                f"for {num_bands} bands is {smallest} pixels"
            )
        base, extra = divmod(deep_rows, num_bands)
        bounds = [0]
        for band in range(num_bands):
            bounds.append(bounds[-1] + base + (band < extra))
        return cls(height=height, width=width, levels=levels, deep_bounds=tuple(bounds))

    @property
    def num_bands(self) -> int:
        return len(self.deep_bounds) - 1

    def _scale(self, level: int) -> int:
        return 2 ** (self.levels - 1 - level)

    def rows(self, band: int, level: int = 0) -> tuple[int, int]:
        """First and past-the-last row of ``band`` at ``level`` (0 = full latent resolution)."""
        scale = self._scale(level)
        return self.deep_bounds[band] * scale, self.deep_bounds[band + 1] * scale

    def band_height(self, band: int, level: int = 0) -> int:
        start, end = self.rows(band, level)
        return end - start

    def max_band_height(self, level: int = 0) -> int:
        return max(self.band_height(band, level) for band in range(self.num_bands))

    def level_of_width(self, width: int) -> int:
        """The level whose feature maps are ``width`` columns wide."""
        for level in range(self.levels):
            if self.width >> level == width:
                return level
        raise ValueError(f"no UNet level of a {self.width}-wide latent is {width} wide")

    def level_of_tokens(self, band: int, tokens: int) -> int:
        """The level at which ``band`` holds ``tokens`` tokens (rows x columns, distinct per level)."""
        for level in range(self.levels):
            if self.band_height(band, level) * (self.width >> level) == tokens:
                return level
        raise ValueError(f"no UNet level of band {band} holds {tokens} tokens")


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """What a model's configs say about the image sizes it can run, and how they are cut into bands."""

    levels: int
    """Resolutions in the UNet (downsamplings + 1)."""
    pixels_per_latent: int
    """The VAE's scale factor."""
    sample_size: int
    """The UNet's default latent size."""

    @classmethod
    def read(cls, model_dir: Path) -> ModelGeometry:
        """From a diffusers model directory's unet/ and vae/ configs, without loading any weights."""
        unet, vae = (json.loads((model_dir / part / "config.json").read_text()) for part in ("unet", "vae"))
        return cls(
            levels=len(unet["block_out_channels"]),
            # diffusers' vae_scale_factor: one 2x upsampling per VAE level after the first
            pixels_per_latent=2 ** (len(vae["block_out_channels"]) - 1),
            sample_size=unet["sample_size"],
        )

    @property
    def default_size(self) -> int:
        """The image side in pixels when a request gives none."""
        return self.sample_size * self.pixels_per_latent

    def smallest_size(self, num_bands: int) -> tuple[int, int]:
        """(height, width) in pixels of the smallest image that splits into ``num_bands`` bands."""
        rows = 2 ** (self.levels - 1) * self.pixels_per_latent
        return num_bands * rows, rows

    def layout(self, height: int, width: int, num_bands: int) -> BandLayout:
        """The bands of an image of ``height`` x ``width`` pixels; raises ConfigError naming the
        first side that cannot be split into ``num_bands`` bands."""
        scale = self.pixels_per_latent
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % scale:
                raise ConfigError(f"{name}: must be a positive multiple of {scale} pixels, got {size!r}")
        return BandLayout.split(height // scale, width // scale, num_bands, self.levels, scale)
