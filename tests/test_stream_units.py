"""The parts of streamed progress that run without a server: the clean-latent probe on every
scheduler, the progress channel, and sdxl_stream's plan (the ensemble's own steps)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from build_engines.repository import ENSEMBLE, STREAM, TEMPLATES_DIR, check_stream, load_template, stream_plan
from distrifusion.clean_latent import CleanLatentProbe
from distrifusion.config import ConfigError, DistriConfig
from distrifusion.pipeline import DistriPipeline, StepProgress
from distrifusion.schedulers import SCHEDULERS
from distrifusion.serving.progress_channel import ProgressListener, ProgressSender, StepMessage
from distrifusion.serving.stream import StepFailed, StreamPlan, StreamRunner


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_dir: Path) -> DistriPipeline:
    return DistriPipeline.from_pretrained(tiny_sdxl_dir, DistriConfig())


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_the_last_steps_clean_latent_is_the_result_on_every_scheduler(
    pipeline: DistriPipeline, scheduler: str
) -> None:
    seen: list[tuple[int, int, torch.Tensor]] = []

    def on_progress(progress: StepProgress) -> None:
        seen.append((progress.step, progress.total, progress.clean_latent().clone()))

    result = pipeline(prompt="a", height=64, width=64, num_inference_steps=6, seed=1, scheduler=scheduler,
                      output_type="latent", on_progress=on_progress)  # fmt: skip
    total = seen[-1][1]
    assert [step for step, _, _ in seen] == list(range(1, total + 1))  # Heun and PNDM: more UNet calls
    final = result.latents
    first_error = ((seen[0][2] - final).norm() / final.norm()).item()
    last_error = ((seen[-1][2] - final).norm() / final.norm()).item()
    # Measured: 0 (PNDM 0.0015: its last step still moves the sample); the first step's x0 is
    # 0.13-1.3 away: a probe that returned the noisy latent, or a stale step, fails.
    assert last_error < 0.01 and first_error > 10 * last_error + 0.05, (first_error, last_error)
    assert "step" not in vars(pipeline.pipe.scheduler)  # the scheduler's own step is back


def test_the_probe_says_when_no_step_ran(pipeline: DistriPipeline) -> None:
    with (
        CleanLatentProbe(pipeline.pipe.scheduler) as probe,
        pytest.raises(RuntimeError, match="no scheduler step"),
    ):
        probe.latent()


def test_frames_cross_the_channel_in_order_with_their_previews(tmp_path: Path) -> None:
    listener = ProgressListener(tmp_path)
    sent = [
        StepMessage(1, 3),
        StepMessage(2, 3, np.arange(2 * 5 * 7 * 3, dtype=np.uint8).reshape(2, 5, 7, 3)),
        StepMessage(3, 3),
    ]

    def stage() -> None:
        sender = ProgressSender.connect(listener.token, tmp_path)
        for message in sent:
            sender.send(message)
        sender.close()

    thread = threading.Thread(target=stage)
    thread.start()
    received = list(listener.messages(finished=lambda: False, cancelled=lambda: False))
    thread.join()
    listener.close()
    assert [(m.step, m.total) for m in received] == [(1, 3), (2, 3), (3, 3)]
    assert received[0].preview is None and np.array_equal(received[1].preview, sent[1].preview)
    assert not (tmp_path / f"{listener.token}.sock").exists()


def test_a_stream_that_closes_is_gone_for_the_stage(tmp_path: Path) -> None:
    listener = ProgressListener(tmp_path)
    sender = ProgressSender.connect(listener.token, tmp_path)
    cancel = threading.Event()
    reader = threading.Thread(
        target=lambda: list(listener.messages(finished=lambda: False, cancelled=cancel.is_set, poll_s=0.05))
    )
    reader.start()
    sender.send(StepMessage(1, 2))
    assert not sender.gone()
    cancel.set()
    reader.join()
    assert sender.gone()
    sender.send(StepMessage(2, 2))  # to a gone stream: nothing, no error
    listener.close()


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("../../../../tmp/x", "expected 32 lowercase hex digits"),
        ("ABCDEF" * 5 + "00", "expected 32 lowercase hex digits"),
        ("0123456789abcdef" * 2, "no stream of this server listens on"),
    ],
)
def test_the_stage_opens_only_a_listening_streams_socket(tmp_path: Path, token: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"progress_token: {message}"):
        ProgressSender.connect(token, tmp_path)


def _template_plan() -> StreamPlan:
    return stream_plan(load_template(TEMPLATES_DIR, ENSEMBLE))


def test_the_stream_runs_the_ensembles_steps_and_gives_the_unet_its_token(tmp_path: Path) -> None:
    calls: list[tuple[str, set[str]]] = []

    def infer(model: str, inputs: dict, outputs: list[str]) -> dict:
        calls.append((model, set(inputs)))
        if model == "unet":
            sender = ProgressSender.connect(str(inputs["progress_token"][0, 0]), tmp_path)
            sender.send(StepMessage(1, 1))
            sender.close()
        return {name: f"{model}.{name}" for name in outputs}

    messages: list[StepMessage] = []
    outputs = StreamRunner(_template_plan(), infer, tmp_path).run(
        {"prompt": "p", "seed": "s", "preview_every": "e"},
        rows=1,
        on_message=messages.append,
        cancelled=lambda: False,
    )
    assert [model for model, _ in calls] == [
        "tokenizer", "text_encoder", "text_encoder", "text_encoder_2", "text_encoder_2", "unet", "vae_decoder"
    ]  # fmt: skip
    assert calls[0][1] == {"prompt", "seed"}  # absent stays absent; preview settings go to the UNet only
    assert {"progress_token", "preview_every", "seed", "negative_given"} <= calls[5][1]
    assert outputs == {
        "image": "vae_decoder.image",
        "used_seed": "unet.seed",
        "truncated": "tokenizer.truncated",
    }
    assert [(m.step, m.total) for m in messages] == [(1, 1)]


def test_a_stream_cancelled_before_a_step_runs_no_more(tmp_path: Path) -> None:
    calls: list[str] = []

    def infer(model: str, inputs: dict, outputs: list[str]) -> dict:
        calls.append(model)
        return {name: name for name in outputs}

    with pytest.raises(StepFailed, match="request cancelled") as raised:
        StreamRunner(_template_plan(), infer, tmp_path).run(
            {"prompt": "p"}, rows=1, on_message=print, cancelled=lambda: len(calls) >= 2
        )
    assert raised.value.kind == "cancelled" and calls == ["tokenizer", "text_encoder"]


def test_the_build_check_catches_a_stream_config_that_drifted_from_the_ensemble() -> None:
    ensemble = load_template(TEMPLATES_DIR, ENSEMBLE)
    stream = load_template(TEMPLATES_DIR, STREAM)
    plan = stream_plan(ensemble)
    assert check_stream(stream, ensemble, plan) == []
    del stream.input[[t.name for t in stream.input].index("seed")]
    stream.model_transaction_policy.decoupled = False
    errors = check_stream(stream, ensemble, StreamPlan(plan.steps[:-1], plan.outputs, plan.unet_model))
    assert errors == [
        "sdxl_stream: lacks the ensemble's input 'seed'",
        "sdxl_stream: not decoupled",
        "sdxl_stream: 1/ensemble_steps.json is not the ensemble's steps",
    ]
