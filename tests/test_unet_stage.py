"""The UNet stage's request checks and instance placement, without a server or ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distrifusion.config import ConfigError
from distrifusion.serving.unet_stage import denoise_request, instance_ranks, parse_request


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
    request = parse_request(inputs(2, seed=np.array([[3], [4]], dtype=np.int64)), 4096, 4096)
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
        parse_request(inputs(2, **fields), 2048, 2048)


def test_missing_negative_prompt_means_zero_embeddings() -> None:
    request = parse_request(inputs(2), 4096, 4096)
    batch = denoise_request([request], force_zeros_for_empty_prompt=True)
    assert batch.prompt_embeds.shape == (2, 77, 10)
    assert (
        torch.count_nonzero(batch.negative_prompt_embeds[1]) == 0
        and torch.count_nonzero(batch.negative_pooled_prompt_embeds[1]) == 0
    )
    assert torch.count_nonzero(batch.negative_prompt_embeds[0]) > 0
    kept = denoise_request([request], force_zeros_for_empty_prompt=False)
    assert torch.count_nonzero(kept.negative_prompt_embeds[1]) > 0


def test_gpu_groups_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert instance_ranks({"gpus": "0,1;2,3"}, "unet_0_1") == (2, [2, 3])
    assert instance_ranks({"gpus": "0,1,2,3"}, "unet_0_0") == (4, [0, 1, 2, 3])
    assert instance_ranks({"ranks": "3"}, "unet_0_0") == (3, None)
    for parameters, message in (
        ({"gpus": "0,1;1,2"}, r"gpus: a GPU appears in more than one place"),
        ({"gpus": "0,7"}, r"gpus: '0,7' names a GPU this machine lacks \(it has 4\)"),
        ({"gpus": "0-3"}, r"gpus: expected comma-separated GPU indices"),
        ({"gpus": "0,1"}, r"gpus: 1 group\(s\) in '0,1', but this is instance 1"),
        ({"ranks": "two"}, r"ranks: must be a non-negative integer, got 'two'"),
    ):
        with pytest.raises(ConfigError, match=message):
            instance_ranks(parameters, "unet_0_1")
