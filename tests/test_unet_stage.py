"""The UNet stage's request checks and instance placement, without a server or ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distrifusion.config import ConfigError
from distrifusion.serving.stage_config import RequestSettings
from distrifusion.serving.unet_stage import denoise_request, parse_request

LIMITS = RequestSettings(max_width=4096, max_height=4096)


def inputs(rows: int = 1, **fields) -> dict:
    rng = np.random.default_rng(0)
    tensors = {
        "hidden_states_1": rng.standard_normal((rows, 77, 4), dtype=np.float32),
        "hidden_states_2": rng.standard_normal((rows, 77, 6), dtype=np.float32),
        "text_embeds": rng.standard_normal((rows, 6), dtype=np.float32),
        "negative_hidden_states_1": rng.standard_normal((rows, 77, 4), dtype=np.float32),
        "negative_hidden_states_2": rng.standard_normal((rows, 77, 6), dtype=np.float32),
        "negative_text_embeds": rng.standard_normal((rows, 6), dtype=np.float32),
        "negative_given": np.array([[row % 2 == 0] for row in range(rows)]),
    }
    return {**tensors, **fields}


def test_defaults_and_shared_settings() -> None:
    request = parse_request(inputs(2, seed=np.array([[3], [4]], dtype=np.int64)), LIMITS)
    assert (request.height, request.width, request.num_inference_steps, request.guidance_scale) == (
        1024,
        1024,
        30,
        5.0,
    )
    assert request.seeds == [3, 4] and request.scheduler is None and request.rows == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_states_1": None}, r"hidden_states_1: required input is missing"),
        (
            {"height": np.array([[512], [768]], dtype=np.int32)},
            r"height: every prompt of one request must use the same value",
        ),
        (
            {"width": np.array([[8192], [8192]], dtype=np.int32)},
            r"width: at most 2048 pixels in this deployment, got 8192",
        ),
        (
            {"height": np.array([[128], [128]], dtype=np.int32)},
            r"height: at least 256 pixels in this deployment, got 128",
        ),
        ({"seed": np.array([[1], [-5]], dtype=np.int64)}, r"seed: expected one seed >= 0 per prompt"),
        ({"scheduler": np.array([[b"\xff"], [b"\xff"]], dtype=np.object_)}, r"scheduler: must be UTF-8 text"),
        (
            {"text_embeds": np.full((2, 6), np.nan, dtype=np.float32)},
            r"text_embeds: expected 2 rows of finite values",
        ),
    ],
)
def test_bad_fields_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(inputs(2, **fields), RequestSettings(max_width=2048, max_height=2048, min_height=256))


def test_missing_negative_prompt_means_zero_embeddings() -> None:
    request = parse_request(inputs(2), LIMITS)
    batch = denoise_request([request], force_zeros_for_empty_prompt=True)
    assert batch.prompt_embeds.shape == (2, 77, 10)
    assert (
        torch.count_nonzero(batch.negative_prompt_embeds[1]) == 0
        and torch.count_nonzero(batch.negative_pooled_prompt_embeds[1]) == 0
    )
    assert torch.count_nonzero(batch.negative_prompt_embeds[0]) > 0
    kept = denoise_request([request], force_zeros_for_empty_prompt=False)
    assert torch.count_nonzero(kept.negative_prompt_embeds[1]) > 0


def test_image_inputs_default_and_batch_apart() -> None:
    image = np.zeros((2, 96, 160, 3), dtype=np.uint8)
    request = parse_request(inputs(2, input_image=image), LIMITS)
    assert (request.height, request.width, request.strength, request.size_from_image) == (96, 160, 0.6, True)
    assert request.passes == ("image_to_image",)
    sized = parse_request(
        inputs(2, input_image=image, height=np.full((2, 1), 512), width=np.full((2, 1), 512)), LIMITS
    )
    assert (sized.height, sized.width, sized.size_from_image) == (512, 512, False)
    two_pass = parse_request(
        inputs(2, first_pass_size=np.array([[256, 320], [256, 320]], dtype=np.int32)), LIMITS
    )
    assert two_pass.first_pass == (256, 320) and two_pass.strength == 0.6
    assert two_pass.passes == ("first_pass", "second_pass")
    plain = parse_request(inputs(2), LIMITS)
    assert plain.passes == ("text_to_image",) and plain.strength == 1.0
    assert len({plain.batch_key, sized.batch_key, two_pass.batch_key}) == 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"input_image": np.zeros((2, 64, 64, 3), dtype=np.float32)},
            r"input_image: expected one uint8 .* got float32",
        ),
        ({"input_image": np.zeros((1, 64, 64, 3), dtype=np.uint8)}, r"input_image: .* per prompt \(2\)"),
        (
            {"first_pass_size": np.array([[256, 256], [512, 512]], dtype=np.int32)},
            r"first_pass_size: .* the same for all",
        ),
        (
            {"first_pass_size": np.array([[0, 256], [0, 256]], dtype=np.int32)},
            r"first_pass_size: 0x256 .* positive multiples of 32",
        ),
    ],
)
def test_bad_image_fields_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_request(inputs(2, **fields), LIMITS)
