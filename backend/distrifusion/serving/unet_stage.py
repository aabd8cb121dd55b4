"""The UNet stage of the served ensemble, without Triton: numpy in, numpy out.

Takes the text encoders' outputs of several requests, checks every field, runs the requests that
share a size, step count, guidance and scheduler as one batch on the patch-parallel group, and
returns per request its latents and seeds, or the error to report.
"""

from __future__ import annotations

import dataclasses
import locale
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import ConfigError
from ..export.specs import VAE_ENCODER
from ..pipeline import StepProgress
from ..unet import StepRecord
from ..vae.decode import SETTINGS_FILE, DecodeSettings, DecodeTooLarge
from ..vae.preview import LatentToRgb
from .denoise import DenoiseRequest, DenoiseResult
from .faults import GroupFault, GroupUnavailable
from .health import HealthBoard, health_directory
from .metrics import FIRST_PASS, IMAGE_TO_IMAGE, SECOND_PASS, TEXT_TO_IMAGE, PassRecord
from .progress_channel import TOKEN_FIELD, ProgressSender, stream_directory
from .stage_config import MODEL_DIRECTORY, STAGE_CONFIG_NAME, RequestSettings, StageConfig
from .stream_progress import DEFAULT_PREVIEW_SIZE, StreamProgress, StreamSettings
from .unet_group import SERVING, EventSink, UNetGroup

ENCODER_INPUTS = (
    "hidden_states_1",
    "hidden_states_2",
    "text_embeds",
    "negative_hidden_states_1",
    "negative_hidden_states_2",
    "negative_text_embeds",
)
REQUIRED_INPUTS = (*ENCODER_INPUTS, "negative_given")
OPTIONAL_INPUTS = ("height", "width", "num_inference_steps", "guidance_scale", "seed", "scheduler")
IMAGE_INPUTS = ("input_image", "strength", "first_pass_size")
"""Image-to-image (``input_image``, ``strength``) and two-pass generation (``first_pass_size``).
Not ``image``: the ensemble's inputs and outputs share one namespace, and ``image`` is its output."""
DEFAULT_STRENGTH = 0.6
SIZE_MULTIPLE = 32
"""A first pass's sides must be multiples of this (the UNet may ask for more: the group checks)."""
STREAM_INPUTS = (TOKEN_FIELD, "preview_every", "preview_size")
"""Set by sdxl_stream (through BLS): where this request's progress goes, and its previews."""
INPUTS = (*REQUIRED_INPUTS, *OPTIONAL_INPUTS, *IMAGE_INPUTS, *STREAM_INPUTS)
OUTPUTS = ("latents", "seed")


def _ignore(kind: str, **details: Any) -> None:
    pass


def _either(first: Callable[[], bool], second: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: first() or second()


class ImageCodec(Protocol):
    """The VAE stages as the UNet stage calls them (BLS in the served model.py)."""

    def encode(self, images: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 ``[rows, h, w, 3]`` -> ``moments`` ``[rows, 2C, height / 8, width / 8]``
        (:class:`~distrifusion.serving.vae_stage.VaeEncoderStage`)."""
        ...

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """``[rows, C, h, w]`` -> uint8 ``[rows, 8h, 8w, 3]``."""
        ...


class Cancelled(Exception):
    """Every request of a batch was cancelled; the remaining steps were skipped."""


@dataclasses.dataclass
class StageRequest:
    """One Triton request: ``rows`` prompts with their encodings and the shared settings."""

    encodings: dict[str, np.ndarray]
    negative_given: np.ndarray
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seeds: list[int | None]
    scheduler: str | None
    stream: StreamSettings | None = None
    image: np.ndarray | None = None
    """Image-to-image: uint8 ``[rows, h, w, 3]``, resized to ``height`` x ``width`` by the encoder."""
    strength: float = 1.0
    first_pass: tuple[int, int] | None = None
    """Two-pass: the first pass's (height, width)."""
    size_from_image: bool = False
    """``height`` and ``width`` are the image's (the request named neither)."""

    @property
    def rows(self) -> int:
        return len(self.seeds)

    @property
    def batch_key(self) -> tuple:
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.scheduler,
            self.image is not None,
            self.strength,
            self.first_pass,
        )

    @property
    def passes(self) -> tuple[str, ...]:
        """The passes this request runs, by their metric name."""
        if self.first_pass is not None:
            return (FIRST_PASS, SECOND_PASS)
        return (IMAGE_TO_IMAGE,) if self.image is not None else (TEXT_TO_IMAGE,)


@dataclasses.dataclass
class StageResult:
    latents: np.ndarray
    """``[rows, 4, height / 8, width / 8]`` float32: the final latents, for the VAE decoder."""
    seeds: np.ndarray
    """``[rows, 1]`` int64."""


def _shared_scalar(
    inputs: Mapping[str, np.ndarray | None], name: str, rows: int, kind: type, default: Any = None
) -> Any:
    value = inputs.get(name)
    if value is None:
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != rows:
        raise ConfigError(f"{name}: expected one value per prompt ({rows}), got {flat.size}")
    differs = flat != flat[0]
    if flat.dtype.kind == "f":  # NaN is checked as a value, by the field's own rule
        differs &= ~(np.isnan(flat) & np.isnan(flat[0]))
    if np.any(differs):
        raise ConfigError(f"{name}: every prompt of one request must use the same value, got {flat.tolist()}")
    return kind(flat[0])


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{name}: must be UTF-8 text") from None
    return str(value)


def parse_request(inputs: Mapping[str, np.ndarray | None], settings: RequestSettings) -> StageRequest:
    """Checks one request's tensors; raises ConfigError naming the first bad field."""
    for name in REQUIRED_INPUTS:
        if inputs.get(name) is None:
            raise ConfigError(f"{name}: required input is missing")
    encodings = {name: np.asarray(inputs[name], dtype=np.float32) for name in ENCODER_INPUTS}
    rows = encodings["hidden_states_1"].shape[0]
    for name, array in encodings.items():
        if array.shape[0] != rows or not np.isfinite(array).all():
            raise ConfigError(f"{name}: expected {rows} rows of finite values, got shape {array.shape}")
    height = _shared_scalar(inputs, "height", rows, int, settings.default_height)
    width = _shared_scalar(inputs, "width", rows, int, settings.default_width)
    for name, size in (("height", height), ("width", width)):
        low, high = getattr(settings, f"min_{name}"), getattr(settings, f"max_{name}")
        if size > high:
            raise ConfigError(f"{name}: at most {high} pixels in this deployment, got {size}")
        if size < low:
            raise ConfigError(f"{name}: at least {low} pixels in this deployment, got {size}")
    guidance = _shared_scalar(inputs, "guidance_scale", rows, float, settings.default_guidance_scale)
    scheduler = inputs.get("scheduler")
    scheduler_name = None
    if scheduler is not None:
        scheduler_name = _text(_shared_scalar(inputs, "scheduler", rows, lambda value: value), "scheduler")
    seeds: list[int | None] = [None] * rows
    if inputs.get("seed") is not None:
        seed_values = np.asarray(inputs["seed"]).reshape(-1)
        if seed_values.size != rows or np.any(seed_values < 0):
            raise ConfigError(f"seed: expected one seed >= 0 per prompt ({rows}), got {seed_values.tolist()}")
        seeds = [int(seed) for seed in seed_values]
    image, strength, first_pass = _image_inputs(inputs, rows, settings)
    size_from_image = image is not None and inputs.get("height") is None and inputs.get("width") is None
    if size_from_image:
        height, width = image.shape[1:3]
    if first_pass is not None and (first_pass[0] > height or first_pass[1] > width):
        raise ConfigError(
            f"first_pass_size: {first_pass[0]}x{first_pass[1]} (height x width) is larger than the "
            f"request's {height}x{width}; the first pass generates at most the final size"
        )
    stream = None
    preview_every = _shared_scalar(inputs, "preview_every", rows, int, 0)
    preview_size = _shared_scalar(inputs, "preview_size", rows, int, DEFAULT_PREVIEW_SIZE)
    if inputs.get(TOKEN_FIELD) is not None:
        token = _text(_shared_scalar(inputs, TOKEN_FIELD, rows, lambda value: value), TOKEN_FIELD)
        stream = StreamSettings(token, preview_every, preview_size)
    elif inputs.get("preview_every") is not None or inputs.get("preview_size") is not None:
        raise ConfigError(
            "preview_every, preview_size: only a streamed request (model sdxl_stream) has previews"
        )
    return StageRequest(
        encodings=encodings,
        negative_given=np.asarray(inputs["negative_given"], dtype=bool).reshape(rows),
        height=height,
        width=width,
        num_inference_steps=_shared_scalar(inputs, "num_inference_steps", rows, int, settings.default_steps),
        guidance_scale=guidance,
        seeds=seeds,
        scheduler=scheduler_name,
        stream=stream,
        image=image,
        strength=strength,
        first_pass=first_pass,
        size_from_image=size_from_image,
    )


def _image_inputs(
    inputs: Mapping[str, np.ndarray | None], rows: int, settings: RequestSettings
) -> tuple[np.ndarray | None, float, tuple[int, int] | None]:
    """``image``, ``strength`` and ``first_pass_size``, checked; ConfigError names the field."""
    image = inputs.get("input_image")
    first_pass = None
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 4 or image.shape[0] != rows or image.shape[-1] != 3:
            raise ConfigError(
                f"input_image: expected one uint8 [height, width, 3] RGB image per prompt ({rows}), got "
                f"{image.dtype} of shape {list(image.shape)}"
            )
        side = max(settings.max_height, settings.max_width)
        if max(image.shape[1:3]) > side or min(image.shape[1:3]) < 8:
            raise ConfigError(
                f"input_image: {image.shape[2]}x{image.shape[1]} pixels; each side must be 8 to {side} (this "
                f"deployment's largest side)"
            )
    if inputs.get("first_pass_size") is not None:
        if image is not None:
            raise ConfigError(
                "first_pass_size: a two-pass request generates its first pass from the prompt; send "
                "input_image or first_pass_size, not both"
            )
        sizes = np.asarray(inputs["first_pass_size"]).reshape(rows, -1)
        if sizes.shape[1] != 2 or np.any(sizes != sizes[0]):
            raise ConfigError(
                f"first_pass_size: expected one [height, width] per prompt, the same for all, got {sizes.tolist()}"
            )
        first_pass = (int(sizes[0][0]), int(sizes[0][1]))
        if min(first_pass) <= 0 or any(side % SIZE_MULTIPLE for side in first_pass):
            raise ConfigError(
                f"first_pass_size: {first_pass[0]}x{first_pass[1]} (height x width) must be positive "
                f"multiples of {SIZE_MULTIPLE} pixels"
            )
    if image is None and first_pass is None:
        if inputs.get("strength") is not None:
            raise ConfigError(
                "strength: only an image-to-image (input_image) or two-pass (first_pass_size) request has one"
            )
        return None, 1.0, None
    strength = _shared_scalar(inputs, "strength", rows, float, DEFAULT_STRENGTH)
    if not 0 < strength <= 1:
        raise ConfigError(f"strength: the share of the schedule that runs, in (0, 1], got {strength:g}")
    return image, strength, first_pass


def denoise_request(requests: list[StageRequest], force_zeros_for_empty_prompt: bool) -> DenoiseRequest:
    """One batch of the requests (which share a batch key), in diffusers' SDXL tensor layout."""

    def stacked(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([request.encodings[name] for request in requests]))

    negative_given = torch.from_numpy(np.concatenate([request.negative_given for request in requests]))
    negative_embeds = torch.cat(
        [stacked("negative_hidden_states_1"), stacked("negative_hidden_states_2")], dim=-1
    )
    negative_pooled = stacked("negative_text_embeds")
    if force_zeros_for_empty_prompt:
        # diffusers' SDXL: no negative prompt means zero embeddings, not the encoded empty string.
        negative_embeds = negative_embeds * negative_given[:, None, None]
        negative_pooled = negative_pooled * negative_given[:, None]
    first = requests[0]
    return DenoiseRequest(
        prompt_embeds=torch.cat([stacked("hidden_states_1"), stacked("hidden_states_2")], dim=-1),
        pooled_prompt_embeds=stacked("text_embeds"),
        negative_prompt_embeds=negative_embeds,
        negative_pooled_prompt_embeds=negative_pooled,
        seeds=[seed for request in requests for seed in request.seeds],
        height=first.height,
        width=first.width,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        scheduler=first.scheduler,
    )


class UNetStage:
    """The patch-parallel group of one model instance plus request handling.

    Starts the group of model instance ``instance`` and warms it up at ``config.warmup``;
    ``text_tokens`` is the token count of the text encoders' hidden states (the warm-up's shape).
    The group's events (state, live ranks, faults, restarts) go to ``on_event`` and its state to
    the server's health board, where the supervisor reads it.
    """

    def __init__(
        self,
        config: StageConfig,
        version_directory: str,
        instance: int,
        text_tokens: int,
        on_event: EventSink = _ignore,
    ) -> None:
        self.requests = config.requests
        self.name = f"unet_{instance}"
        self._steps: list[StepRecord] = []
        self._server = os.getppid()
        self._on_event = on_event
        self._health = HealthBoard(health_directory(self._server))
        self.latent_map = LatentToRgb.load(os.path.join(version_directory, MODEL_DIRECTORY))
        self._passes: list[PassRecord] = []
        vae_settings = os.path.join(version_directory, SETTINGS_FILE)
        self.vae_settings = (
            DecodeSettings.load(Path(version_directory)) if os.path.isfile(vae_settings) else None
        )
        """The VAE stages' budget, to refuse an image-to-image or two-pass request before any work."""
        placement = config.placement
        gpus = placement.instance_gpus(instance, torch.cuda.device_count() if placement.gpus else 0)
        self.group = UNetGroup(
            os.path.join(version_directory, MODEL_DIRECTORY),
            config.engine,
            placement.ranks_per_instance,
            None if gpus is None else list(gpus),
            placement.threads_per_rank,
            policy=config.faults,
            on_event=self._group_event,
        )
        try:
            self.force_zeros_for_empty_prompt = bool(
                self.group.pipeline.pipe.config.get("force_zeros_for_empty_prompt", True)
            )
            # Largest first: every smaller size is then measured with the allocator in the state a
            # larger request leaves it in (on the CPU a later request of a smaller size grew the
            # resident memory by up to 1.5 times more than when it was measured first).
            for width, height in sorted(config.warmup, key=lambda size: size[0] * size[1], reverse=True):
                self.group.warm_up(height, width, text_tokens)
        except BaseException:
            self.group.close()
            raise
        self._publish(self.group.state)

    @classmethod
    def load(
        cls,
        model_config: Mapping[str, Any],
        version_directory: str,
        instance_name: str,
        on_event: EventSink = _ignore,
    ) -> UNetStage:
        """The stage of one Triton model instance: its ``config.pbtxt`` (as the JSON Triton passes to
        ``initialize``), its version folder, and its instance name (``unet_0_<index>``)."""
        if model_config.get("parameters"):
            # The settings live in stage_config.json: a parameter here would be silently ignored.
            raise ConfigError(
                f"config.pbtxt parameters {sorted(model_config['parameters'])} are not read: the UNet "
                f"stage's settings are in {STAGE_CONFIG_NAME} (written by build_engines)"
            )
        config = StageConfig.from_json_file(os.path.join(version_directory, STAGE_CONFIG_NAME))
        if config.engine.compile:
            # Triton's stub embeds Python without applying the environment's locale: rank 0 (this
            # process) decoded inductor's compiler output as ASCII and its compile failed at load
            # ("'ascii' codec can't decode byte 0xe2"). The spawned ranks start with it applied.
            locale.setlocale(locale.LC_CTYPE, "")
        tokens = next(t["dims"][0] for t in model_config["input"] if t["name"] == ENCODER_INPUTS[0])
        match = re.search(r"_(\d+)$", instance_name)
        instance = int(match.group(1)) if match else 0
        return cls(config, version_directory, instance, int(tokens), on_event)

    def _group_event(self, kind: str, **details: Any) -> None:
        if kind == "state" and hasattr(self, "group"):  # the group's first events come from its constructor
            self._publish(details["state"], fault=details.get("fault"), error=details.get("error"))
        self._on_event(kind, **details)

    def _publish(self, state: str, **detail: Any) -> None:
        self._health.publish(
            self.name, state, ranks=self.group.ranks, workers=self.group.worker_pids, **detail
        )

    def run(
        self,
        inputs: list[Mapping[str, np.ndarray | None]],
        cancelled: list[Callable[[], bool]],
        codec: ImageCodec | None = None,
    ) -> list[StageResult | Exception]:
        """Per request, its result or the exception to report (ConfigError: the client's fault).
        ``codec`` runs the VAE stages for image-to-image and two-pass requests (without it they are
        refused)."""
        senders: dict[int, ProgressSender] = {}
        self._codec = codec
        try:
            return self._run(inputs, list(cancelled), senders)
        finally:
            for sender in senders.values():
                sender.close()

    def _run(
        self,
        inputs: list[Mapping[str, np.ndarray | None]],
        cancelled: list[Callable[[], bool]],
        senders: dict[int, ProgressSender],
    ) -> list[StageResult | Exception]:
        outcomes: dict[int, StageResult | Exception] = {}
        batches: dict[tuple, list[tuple[int, StageRequest]]] = {}
        for index, request_inputs in enumerate(inputs):
            if cancelled[index]():  # cancelled while queued: no step is spent on it
                outcomes[index] = Cancelled("request cancelled")
                continue
            try:
                request = parse_request(request_inputs, self.requests)
                self._validate(request)
                if request.stream is not None:
                    senders[index] = self._connect(request.stream)
            except ConfigError as error:
                outcomes[index] = error.with_traceback(None)
                continue
            if index in senders:
                # A stream that closed its end is a cancelled (or disconnected) client.
                cancelled[index] = _either(cancelled[index], senders[index].gone)
            batches.setdefault(request.batch_key, []).append((index, request))
        fault: GroupFault | None = None
        for members in batches.values():
            indices = [index for index, _ in members]
            if fault is not None:
                # Responses of one execute() leave together: holding these for the rebuild would
                # hold the failed request's answer too. They were not started; retrying is safe.
                results: list[StageResult | Exception] = [fault] * len(members)
            elif self.group.wait_serving() != SERVING:
                results = [GroupUnavailable(self.group.unavailable_reason())] * len(members)
            else:
                try:
                    results = self._run_batch(
                        [request for _, request in members],
                        [cancelled[i] for i in indices],
                        [senders.get(i) for i in indices],
                    )
                except GroupFault as lost:
                    # Without its traceback: this frame would hold it in a cycle (and with it every
                    # tensor of the failed generation) until a full garbage collection.
                    fault = lost.with_traceback(None)
                    results = [fault] * len(members)
                except Exception as error:  # reported per request; the server keeps serving
                    results = [error.with_traceback(None)] * len(members)
            outcomes.update(zip(indices, results, strict=True))
        return [outcomes[index] for index in range(len(inputs))]

    def _validate(self, request: StageRequest) -> None:
        """Every pass of the request against the group (its sizes, and the memory each needs) and
        the VAE stages' budget, before any work."""
        target = denoise_request([request], self.force_zeros_for_empty_prompt)
        try:
            self.group.validate(target)
        except ConfigError as error:
            if request.size_from_image:
                raise ConfigError(
                    f"input_image: generating at its size, {request.width}x{request.height}, fails: {error}; send "
                    "height and width (it is resized to them)"
                ) from None
            raise
        if request.first_pass is not None:
            height, width = request.first_pass
            try:
                self.group.validate(dataclasses.replace(target, height=height, width=width))
            except ConfigError as error:
                raise ConfigError(f"first_pass_size: {error}") from None
        if request.image is None and request.first_pass is None:
            return
        if int(request.num_inference_steps * request.strength) < 1:
            raise ConfigError(
                f"strength: {request.strength:g} of {request.num_inference_steps} steps runs none; at least "
                f"{1 / request.num_inference_steps:.3g} at this step count"
            )
        field = "input_image" if request.image is not None else "first_pass_size"
        if self._codec is None or self.vae_settings is None:
            raise ConfigError(f"{field}: this deployment has no VAE encoder stage (rebuild its repository)")
        scale = self.vae_settings.footprint.scale_factor
        try:
            self.vae_settings.check(request.height // scale, request.width // scale, stage=VAE_ENCODER)
        except DecodeTooLarge as error:
            raise ConfigError(f"{field}: {error}") from None

    def _connect(self, stream: StreamSettings) -> ProgressSender:
        if stream.preview_every and self.latent_map is None:
            raise ConfigError(
                "preview_every: this deployment's model has no latent-to-RGB map for previews (build "
                "it from a model whose VAE folder has one, or SDXL's VAE); 0 streams progress only"
            )
        return ProgressSender.connect(stream.token, stream_directory(self._server))

    def _run_batch(
        self,
        requests: list[StageRequest],
        cancelled: list[Callable[[], bool]],
        senders: list[ProgressSender | None],
    ) -> list[StageResult | Exception]:
        progress = StreamProgress(self.latent_map)
        start = 0
        for request, sender in zip(requests, senders, strict=True):
            if sender is not None and request.stream is not None:
                progress.add(sender, slice(start, start + request.rows), request.stream)
            start += request.rows

        def should_stop() -> bool:
            return self._server_gone() or all(is_cancelled() for is_cancelled in cancelled)

        first = requests[0]
        batch = denoise_request(requests, self.force_zeros_for_empty_prompt)
        if first.passes == (TEXT_TO_IMAGE,):
            result = self._pass(TEXT_TO_IMAGE, batch, should_stop, progress)
        else:
            result = self._image_passes(requests, batch, should_stop, progress)
        progress.flush()
        if result.interrupted:
            return [Cancelled("request cancelled")] * len(requests)
        outputs: list[StageResult | Exception] = []
        start = 0
        for request in requests:
            end = start + request.rows
            seeds = np.asarray(result.seeds[start:end], dtype=np.int64).reshape(-1, 1)
            outputs.append(StageResult(latents=result.latents[start:end].numpy().copy(), seeds=seeds))
            start = end
        return outputs

    def _pass(
        self,
        name: str,
        batch: DenoiseRequest,
        should_stop: Callable[[], bool],
        progress: StreamProgress,
        steps_before: int = 0,
        steps_after: int = 0,
    ) -> DenoiseResult:
        """One denoising pass; a stream counts its steps after ``steps_before`` and in a total that
        includes ``steps_after`` (a two-pass request's progress runs once from 1 to its total)."""
        on_progress = None
        if progress:

            def on_progress(step: StepProgress) -> None:
                total = steps_before + step.total + steps_after
                progress.on_progress(dataclasses.replace(step, step=steps_before + step.step, total=total))

        started = time.perf_counter()
        result = self.group.denoise(batch, should_stop=should_stop, on_progress=on_progress)
        self._steps.extend(self.group.pipeline.unet.steps)
        self._passes.append(PassRecord(name, time.perf_counter() - started))
        return result

    def _image_passes(
        self,
        requests: list[StageRequest],
        batch: DenoiseRequest,
        should_stop: Callable[[], bool],
        progress: StreamProgress,
    ) -> DenoiseResult:
        """Image-to-image from the requests' images, or two passes: the first from the prompt at
        ``first_pass_size``, its image upscaled and refined at the final size; one seed for both."""
        assert self._codec is not None
        first = requests[0]
        batch = dataclasses.replace(
            batch,
            seeds=[random.randrange(2**63) if seed is None else seed for seed in batch.seeds],
            strength=first.strength,
        )
        if first.first_pass is None:
            # Per request: each request's images share a size, a batch's need not.
            moments = np.concatenate(
                [self._codec.encode(request.image, first.height, first.width) for request in requests]
            )
            return self._pass(
                IMAGE_TO_IMAGE,
                dataclasses.replace(batch, image_moments=torch.from_numpy(moments)),
                should_stop,
                progress,
            )
        pipeline = self.group.pipeline
        steps = (
            pipeline.steps_run(batch.num_inference_steps, batch.scheduler),
            pipeline.steps_run(batch.num_inference_steps, batch.scheduler, first.strength),
        )
        height, width = first.first_pass
        drafted = self._pass(
            FIRST_PASS,
            dataclasses.replace(batch, height=height, width=width),
            should_stop,
            progress,
            steps_after=steps[1],
        )
        if drafted.interrupted or should_stop():
            return dataclasses.replace(drafted, interrupted=True)
        started = time.perf_counter()
        images = self._codec.decode(drafted.latents.numpy())
        moments = self._codec.encode(images, first.height, first.width)
        coding = time.perf_counter() - started
        refined = self._pass(
            SECOND_PASS,
            dataclasses.replace(batch, image_moments=torch.from_numpy(moments)),
            should_stop,
            progress,
            steps_before=steps[0],
        )
        self._passes[-1] = dataclasses.replace(self._passes[-1], seconds=self._passes[-1].seconds + coding)
        return refined

    def take_passes(self) -> list[PassRecord]:
        """The passes run since the last call (for metrics)."""
        passes, self._passes = self._passes, []
        return passes

    def _server_gone(self) -> bool:
        # A stub whose tritonserver died would otherwise denoise to the end for nobody.
        return os.getppid() != self._server

    def take_steps(self) -> list[StepRecord]:
        """The UNet steps run since the last call (for metrics)."""
        steps, self._steps = self._steps, []
        return steps

    def close(self) -> None:
        self.group.close()
        self._publish("closed")
