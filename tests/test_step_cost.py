"""A step's expected time from its work: the UNet's FLOPs as a function of the latent size, and
the scaling of timed steps to sizes not run yet."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from distrifusion.serving.step_cost import StepTimes, StepWork
from distrifusion.tiny_model import sdxl_unet_config


@pytest.fixture(scope="module")
def unet_config() -> dict:
    return sdxl_unet_config(cross_attention_dim=96, pooled_projection_dim=64)


def counted(config: dict, rows: int, height: int, width: int) -> float:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(
                torch.empty(rows, 4, height, width),
                torch.tensor(1.0),
                torch.empty(rows, 77, config["cross_attention_dim"]),
                added_cond_kwargs={
                    "text_embeds": torch.empty(rows, pooled),
                    "time_ids": torch.empty(rows, 6),
                },
            )
    return float(counter.get_total_flops())


def test_the_work_model_matches_a_count_at_sizes_it_was_not_fitted_at(unet_config: dict) -> None:
    """Convolutions grow with the pixels, self-attention with their square, embeddings not at all:
    three counts fix the curve for every size, aspect and row count."""
    work = StepWork.count(unet_config, 77)
    for rows, height, width in ((2, 40, 24), (4, 64, 96)):
        expected = counted(unet_config, rows, height, width)
        assert work.flops(rows, height * width) == pytest.approx(expected, rel=1e-9)


def test_a_size_not_run_is_scaled_from_the_nearest_timed_one_below() -> None:
    work = StepWork(constant=0.0, linear=1.0, quadratic=0.0)  # work = rows x latent pixels
    times = StepTimes(work, pixels_per_latent=8)
    assert times.expected(2, 512, 512) is None
    times.record(2, 256, 256, seconds=1.0)
    times.record(2, 512, 512, seconds=2.0)
    assert times.expected(2, 512, 512).seconds == 2.0  # measured
    # 1024x1024: 4x the work of 512x512, the nearest timed size below.
    assert times.expected(2, 1024, 1024).seconds == pytest.approx(8.0)
    # 384x384: between; from 256x256 (2.25x its work), which errs long.
    assert times.expected(2, 384, 384).seconds == pytest.approx(2.25)
    # Below every timed size: scaled down from the smallest.
    assert times.expected(1, 256, 256).seconds == pytest.approx(0.5)
    assert "256x256" in times.expected(2, 384, 384).basis
