"""The build step: ONNX exports against PyTorch and diffusers, tokenization, the generated repository."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup

from build_engines import tensorrt as trt_build
from build_engines.build import build_parser, main, parse_resolutions, unet_stage_config
from build_engines.repository import (
    TEMPLATES_DIR,
    RepositoryError,
    check_ensemble,
    check_repository,
    copy_unet_model,
    format_config,
    load_template,
    parse_config,
    stage_config,
    tokenizer_spec,
    unet_config,
    validate_config,
)
from distrifusion.config import ConfigError, DistriConfig
from distrifusion.export import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    VAE_DECODER,
    VAE_ENCODER_ENGINES,
    VAE_ENGINES,
    VAE_TILE_STATISTICS,
    VAE_TILES,
    VAE_WHOLE,
    VaeDecoderExport,
    check_stage,
    export_stage,
    ort_session,
    run_ort,
    stage_modules,
    text_encoder_cases,
    vae_decoder_cases,
    vae_encoder_cases,
)
from distrifusion.serving.faults import FaultPolicy
from distrifusion.serving.stage_config import STAGE_CONFIG_NAME, Placement, RequestSettings, StageConfig
from distrifusion.serving.tokenize import MAX_TEXT_BYTES, SDXLTokenizers, TokenizeError
from distrifusion.vae.decode import DecodeSettings
from distrifusion.vae.export import tile_decoder_spec, tile_statistics_spec
from distrifusion.vae.preview import LatentToRgb

ROOT = Path(__file__).resolve().parents[1]

BOS, EOS = 49406, 49407
SERVING_MODELS = {"sdxl", "tokenizer", "text_encoder", "text_encoder_2", "unet", "vae_decoder"}
# The VAE stage's engines (called through BLS), the streamed model (the ensemble's steps through BLS)
# and the supervisor's gate: not the ensemble's steps.
ALL_VAE_ENGINES = (*VAE_ENGINES, *VAE_ENCODER_ENGINES)
# ... and the image-to-image encoder stage the UNet stage calls (BLS), with its engines.
EXPECTED_MODELS = SERVING_MODELS | set(ALL_VAE_ENGINES) | {"readiness_gate", "sdxl_stream", "vae_encoder"}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def tokenizers(tiny_sdxl_dir: Path) -> SDXLTokenizers:
    return SDXLTokenizers.from_pretrained(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each stage exported once: name -> (torch wrapper, spec, model.onnx path)."""
    out = tmp_path_factory.mktemp("onnx")
    modules = stage_modules(
        {TEXT_ENCODER: pipe.text_encoder, TEXT_ENCODER_2: pipe.text_encoder_2, VAE_DECODER: pipe.vae}
    )
    ids = np.tile(np.array([BOS, 320, 1929, EOS] + [EOS] * 73, dtype=np.int32), (2, 1))
    result = {}
    for name, (module, spec) in modules.items():
        if name in VAE_ENGINES:
            example = vae_decoder_cases(4, [(2, 8, 8)], module=module)[0]
        elif name in VAE_ENCODER_ENGINES:
            example = vae_encoder_cases([(2, 64, 64)], module=module)[0]
        else:
            example = {"input_ids": ids}
        exported_stage = export_stage(module, spec, out / name / "model.onnx", example)
        result[name] = (module, spec, exported_stage.path)
    return result


@pytest.fixture(scope="module")
def cpu_repo(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("build") / "repo"
    args = ["--model", str(tiny_sdxl_dir), "--output", str(output), "--target", "cpu"]
    args += ["--batch-sizes", "1,3", "--unet-ranks", "2", "--mode", "full_sync", "--warmup-steps", "2"]
    args += ["--max-resolution", "512x512"]
    assert main(args) == 0
    return output


@pytest.fixture(scope="module")
def gpu_build(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The gpu target built here up to its engines: a stand-in for TensorRT's builder takes each
    ONNX graph and profile the build hands it, and refuses what TensorRT's parser would (by the
    rules, at the profile's largest shapes); every other part of the gpu build runs as on a GPU."""
    from build_engines.parser_rules import check_graph

    profiles: dict = {}

    def build_engine(
        onnx_path: Path, plan_path: Path, spec, profile, fp16: bool, workspace_bytes: int
    ) -> dict:
        largest = {name: shapes[2] for name, shapes in profile.shapes.items()}
        violations = check_graph(onnx_path, largest)
        if violations:
            raise RuntimeError(f"{spec.name}: TensorRT's parser refuses it: {violations}")
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        profiles[spec.name] = profile
        return {"model": spec.name, "precision": "fp16" if fp16 else "fp32+tf32", "builder": "stand-in"}

    output = tmp_path_factory.mktemp("gpu-build") / "repo"
    args = ["--model", str(tiny_sdxl_dir), "--output", str(output), "--target", "gpu"]
    args += ["--unet-gpus", "0,1;2,3", "--max-resolution", "2048x2048", "--batch-sizes", "1,2"]
    with pytest.MonkeyPatch.context() as patch:
        info = {"tensorrt_version": "stand-in", "gpu": "none", "compute_capability": "0.0"}
        patch.setattr(trt_build, "preflight", lambda: info)
        patch.setattr(trt_build, "build_engine", build_engine)
        assert main(args) == 0
    return output, profiles


# --- tokenizer --------------------------------------------------------------------------------------


def test_each_tokenizer_keeps_its_own_padding(tokenizers: SDXLTokenizers, pipe) -> None:
    batch = tokenizers.encode(["a red fox in snow"])
    ids_1, ids_2 = batch.input_ids[0], batch.input_ids_2[0]
    assert batch.input_ids.dtype == np.int32 and batch.input_ids.shape == (1, 77)
    end = int(np.argmax(ids_1 == EOS))
    assert ids_1[0] == BOS and (ids_1[end:] == EOS).all()  # pads with <|endoftext|>
    assert ids_2[end] == EOS and (ids_2[end + 1 :] == 0).all()  # pads with "!" (id 0)
    assert (ids_1[:end] == ids_2[:end]).all()  # one shared vocabulary
    # The same ids as diffusers' own tokenization in the SDXL pipeline.
    for ours, tokenizer in ((ids_1, pipe.tokenizer), (ids_2, pipe.tokenizer_2)):
        theirs = tokenizer(
            "a red fox in snow", padding="max_length", max_length=77, truncation=True, return_tensors="np"
        ).input_ids[0]
        assert (ours == theirs).all()


def test_truncation_is_reported_for_prompt_and_negative_prompt(tokenizers: SDXLTokenizers) -> None:
    long_text = "a very long prompt " * 30
    batch = tokenizers.encode(["short", long_text, "short"], [None, None, long_text])
    assert batch.truncated.dtype == np.bool_ and batch.truncated.shape == (3, 1)
    assert batch.truncated.ravel().tolist() == [False, True, True]
    cut = batch.input_ids[1]
    assert cut[0] == BOS and cut[-1] == EOS and EOS not in cut[1:-1]
    # Exactly at the limit (75 words of one token each + start + end) is not truncated.
    exact = tokenizers.encode(["cat " * 75, "cat " * 76])
    assert exact.truncated.ravel().tolist() == [False, True]


def test_negative_given_and_the_ids_of_an_absent_negative_prompt(tokenizers: SDXLTokenizers) -> None:
    batch = tokenizers.encode(["a", "b", "c", "d"], [None, "", "   ", "blurry"])
    assert batch.negative_given.dtype == np.bool_ and batch.negative_given.shape == (4, 1)
    assert batch.negative_given.ravel().tolist() == [False, False, False, True]
    empty = tokenizers.encode(["x"], [""]).negative_input_ids_2[0]
    assert (batch.negative_input_ids_2[:3] == empty).all()  # absent and blank: the empty prompt's ids
    assert batch.negative_input_ids[0][:2].tolist() == [BOS, EOS]
    assert not (batch.negative_input_ids[3] == batch.negative_input_ids[0]).all()
    assert tokenizers.encode(["a"]).negative_given.ravel().tolist() == [False]


def test_triton_bytes_tensors_are_decoded(tokenizers: SDXLTokenizers) -> None:
    prompt = np.array([["héllo wörld".encode()], [b"a cat"]], dtype=object)
    negative = np.array([[b""], [b"blurry"]], dtype=object)
    batch = tokenizers.encode_tensors(prompt, negative)
    assert batch.input_ids.shape == (2, 77) and batch.negative_given.ravel().tolist() == [False, True]
    same = tokenizers.encode(["héllo wörld", "a cat"], [None, "blurry"])
    for name, array in batch.as_dict().items():
        assert array.dtype == same.as_dict()[name].dtype
        assert (array == same.as_dict()[name]).all(), name


@pytest.mark.parametrize(
    ("prompt", "negative", "field"),
    [
        (None, None, "prompt"),
        (np.array([[b""]], dtype=object), None, "prompt"),
        (np.array([[b"  "]], dtype=object), None, "prompt"),
        (np.array([[b"\xff\xfe bad"]], dtype=object), None, "prompt"),
        (np.array([[b"ok"]], dtype=object), np.array([[b"\xc3\x28"]], dtype=object), "negative_prompt"),
        (np.array([[b"ok"], [b"ok"]], dtype=object), np.array([[b"no"]], dtype=object), "negative_prompt"),
        (np.array([[b"a", b"b"]], dtype=object), None, "prompt"),
    ],
    ids=["missing", "empty", "blank", "not-utf8", "negative-not-utf8", "batch-mismatch", "two-per-row"],
)
def test_bad_requests_name_the_field(tokenizers: SDXLTokenizers, prompt, negative, field: str) -> None:
    with pytest.raises(TokenizeError) as raised:
        tokenizers.encode_tensors(prompt, negative)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_a_huge_prompt_is_refused_before_any_tokenizing(tokenizers: SDXLTokenizers) -> None:
    huge = np.array([[b"lighthouse " * 1_000_000]], dtype=object)  # 11 MB
    with pytest.raises(TokenizeError, match=r"prompt: is 11000000 bytes long; at most 16384 bytes"):
        tokenizers.encode_tensors(huge, None)  # checked on the bytes: tokenizing 10 MB took 32 s
    longest = np.array([[b"a" * MAX_TEXT_BYTES]], dtype=object)
    assert tokenizers.encode_tensors(longest, None).truncated.all()


# --- ONNX exports -----------------------------------------------------------------------------------


def test_text_encoders_match_pytorch_and_diffusers_encode_prompt(exported, pipe, tokenizers) -> None:
    for name in (TEXT_ENCODER, TEXT_ENCODER_2):
        module, spec, path = exported[name]
        ids = tokenizers.encode(["a red fox", "word " * 90, "x"]).input_ids
        # Dynamic batch: 3 and 1, different from the export's 2.
        result = check_stage(module, spec, path, text_encoder_cases(ids), atol=1e-5, rtol=1e-5)
        assert result.passed, result.summary()

    prompt, negative = "a lighthouse at dawn", "fog, blurry"
    batch = tokenizers.encode([prompt], [negative])
    te1 = ort_session(exported[TEXT_ENCODER][2])
    te2 = ort_session(exported[TEXT_ENCODER_2][2])
    h1 = run_ort(te1, {"input_ids": batch.input_ids})["hidden_states"]
    out2 = run_ort(te2, {"input_ids": batch.input_ids_2})
    nh1 = run_ort(te1, {"input_ids": batch.negative_input_ids})["hidden_states"]
    nout2 = run_ort(te2, {"input_ids": batch.negative_input_ids_2})
    assert h1.shape == (1, 77, 32) and out2["hidden_states"].shape == (1, 77, 64)
    assert out2["text_embeds"].shape == (1, 64)
    with torch.no_grad():
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, negative_prompt=negative, device="cpu", do_classifier_free_guidance=True
        )
    # What the UNet stage will concatenate is what diffusers conditions on.
    np.testing.assert_allclose(np.concatenate([h1, out2["hidden_states"]], -1), embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.concatenate([nh1, nout2["hidden_states"]], -1), negative_embeds, atol=2e-5)
    np.testing.assert_allclose(out2["text_embeds"], pooled.numpy(), atol=2e-5)
    np.testing.assert_allclose(nout2["text_embeds"], negative_pooled.numpy(), atol=2e-5)


def test_vae_decoder_gives_diffusers_decoded_and_postprocessed_pixels(exported, pipe) -> None:
    module, spec, path = exported[VAE_WHOLE]
    session = ort_session(path)
    scaling = pipe.vae.config.scaling_factor
    assert scaling == pytest.approx(0.13025)
    # Batch 1 and 3, square and not: dynamic batch, height and width.
    for case in vae_decoder_cases(4, [(1, 16, 24), (3, 8, 8)], seed=3):
        latents = case["latents"]
        image = run_ort(session, case)["image"]
        b, _, h, w = latents.shape
        assert image.dtype == np.uint8 and image.shape == (b, 8 * h, 8 * w, 3)
        with torch.no_grad():
            decoded = pipe.vae.decode(torch.from_numpy(latents) / scaling).sample
        pil = pipe.image_processor.postprocess(decoded, output_type="pil")
        expected = np.stack([np.asarray(p) for p in pil])
        diff = np.abs(image.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    result = check_stage(module, spec, path, vae_decoder_cases(4, [(2, 8, 16)], seed=4))
    assert result.passed, result.summary()


def test_vae_latent_mean_and_std_are_undone_as_diffusers_does(pipe) -> None:
    vae = type(pipe.vae).from_config(pipe.vae.config).eval()
    vae.load_state_dict(pipe.vae.state_dict())
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    wrapper = VaeDecoderExport(vae)
    latents = torch.randn(1, 4, 8, 8)
    # diffusers' StableDiffusionXLPipeline: latents * std / scaling_factor + mean
    expected = latents * torch.tensor(std).view(1, 4, 1, 1) / vae.config.scaling_factor + torch.tensor(
        mean
    ).view(1, 4, 1, 1)
    torch.testing.assert_close(wrapper.unscale(latents), expected)
    torch.testing.assert_close(VaeDecoderExport(pipe.vae).unscale(latents), latents / 0.13025)


def test_large_weights_go_to_one_external_data_file(pipe, tmp_path: Path) -> None:
    modules = stage_modules(
        {TEXT_ENCODER: pipe.text_encoder, TEXT_ENCODER_2: pipe.text_encoder_2, VAE_DECODER: pipe.vae}
    )
    module, spec = modules[TEXT_ENCODER_2]
    ids = np.tile(np.array([BOS, 320, EOS] + [0] * 74, dtype=np.int32), (2, 1))
    result = export_stage(
        module, spec, tmp_path / "model.onnx", {"input_ids": ids}, external_data_threshold=0
    )
    assert result.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert check_stage(module, spec, result.path, text_encoder_cases(ids)).passed
    # TensorRT's parser rules are read from the graph alone (SDXL's text_encoder_2: 2.8 GB of weights).
    from build_engines.parser_rules import check_graph

    assert check_graph(result.path, {"input_ids": [4, 77]}) == []


# --- the CPU build ----------------------------------------------------------------------------------


def _configs(repo: Path) -> dict[str, ModelConfig]:
    return {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def _io(config: ModelConfig, kind: str) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in getattr(config, kind)}


def _copy(config: ModelConfig) -> ModelConfig:
    """An independent copy, through the text format (as written and read back)."""
    return parse_config(format_config(config))


def test_cpu_vae_graphs_run_attention_fused_within_the_cost_model(cpu_repo: Path) -> None:
    """ONNX Runtime's fused attention in the three VAE graphs (not in the text encoders), and one
    call's measured peak under what the stage budgets for it."""
    import onnx

    from benchmarks.vae_memory import measure

    for name in (TEXT_ENCODER, *ALL_VAE_ENGINES):
        ops = {node.op_type for node in onnx.load(str(cpu_repo / name / "1" / "model.onnx")).graph.node}
        assert ("MultiHeadAttention" in ops) == (name in ALL_VAE_ENGINES), name
    settings = DecodeSettings.load(cpu_repo / VAE_DECODER / "1")
    assert not settings.attention_materialised
    for engine, batch, side in ((VAE_WHOLE, 1, 96), (VAE_TILE_STATISTICS, 2, 48), (VAE_TILES, 2, 48)):
        peak = measure(cpu_repo / engine / "1" / "model.onnx", batch, side, side)
        budgeted = settings.footprint.peak_bytes(engine, batch, side, side, attention_materialised=False)
        assert peak <= budgeted, (
            f"{engine}: {peak / 2**20:.0f} MiB measured, {budgeted / 2**20:.0f} MiB budgeted"
        )


def test_cpu_build_writes_a_complete_loadable_repository(cpu_repo: Path) -> None:
    assert {p.name for p in cpu_repo.iterdir() if p.is_dir()} == EXPECTED_MODELS
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, *ALL_VAE_ENGINES):
        assert {p.name for p in (cpu_repo / name / "1").iterdir()} == {
            "model.onnx",
            "model.py",
            "triton_glue.py",
        }
    stage_files = {p.name for p in (cpu_repo / VAE_DECODER / "1").iterdir()}
    assert stage_files == {"model.py", "triton_glue.py", "vae_decode.json"}
    settings = DecodeSettings.load(cpu_repo / VAE_DECODER / "1")
    assert settings.footprint.scale_factor == 8 and settings.element_limit is None  # ONNX Runtime
    tokenizer = cpu_repo / "tokenizer" / "1"
    assert (tokenizer / "model.py").is_file()
    assert (tokenizer / "tokenizer" / "tokenizer_config.json").is_file()
    assert (tokenizer / "tokenizer_2" / "tokenizer_config.json").is_file()
    assert (cpu_repo / "sdxl" / "1").is_dir()
    assert (cpu_repo / "unet" / "1" / "model.py").is_file()
    assert not list(cpu_repo.parent.glob(".repo.*")), "staging folder left behind"

    configs = check_repository(cpu_repo)  # schema, names, ensemble consistency
    assert set(configs) == EXPECTED_MODELS
    assert configs["readiness_gate"].max_batch_size == 0
    for name in SERVING_MODELS:
        assert configs[name].max_batch_size == 3, name
    assert configs[VAE_WHOLE].max_batch_size == 1  # the stage decodes one image per call
    assert configs["vae_encoder_whole"].max_batch_size == 1
    for name in (VAE_TILE_STATISTICS, VAE_TILES, "vae_encoder_tile_statistics", "vae_encoder_tiles"):
        assert configs[name].max_batch_size == settings.tiles_per_call
    for name, config in configs.items():
        assert validate_config(config) == [], name
    # Triton's own schema, strictly (unknown fields or bad enum values raise).
    for path in cpu_repo.glob("*/config.pbtxt"):
        parsed = text_format.Parse(path.read_text(), ModelConfig())
        assert parsed.name == path.parent.name


def test_tensor_names_and_dims_are_consistent_across_the_ensemble(cpu_repo: Path) -> None:
    configs = _configs(cpu_repo)
    request_inputs = _io(configs["sdxl"], "input")
    assert request_inputs == {
        "prompt": ("TYPE_STRING", [1]),
        "negative_prompt": ("TYPE_STRING", [1]),
        "height": ("TYPE_INT32", [1]),
        "width": ("TYPE_INT32", [1]),
        "num_inference_steps": ("TYPE_INT32", [1]),
        "guidance_scale": ("TYPE_FP32", [1]),
        "seed": ("TYPE_INT64", [1]),
        "scheduler": ("TYPE_STRING", [1]),
        "input_image": ("TYPE_UINT8", [-1, -1, 3]),
        "strength": ("TYPE_FP32", [1]),
        "first_pass_size": ("TYPE_INT32", [2]),
    }
    # The tokenizer takes every request input (it ignores the generation options: they only let a
    # request without a prompt reach it), so it can name a missing prompt in its error.
    assert _io(configs["tokenizer"], "input") == request_inputs
    assert _io(configs["tokenizer"], "output") == {
        "input_ids": ("TYPE_INT32", [77]),
        "input_ids_2": ("TYPE_INT32", [77]),
        "negative_input_ids": ("TYPE_INT32", [77]),
        "negative_input_ids_2": ("TYPE_INT32", [77]),
        "negative_given": ("TYPE_BOOL", [1]),
        "truncated": ("TYPE_BOOL", [1]),
    }
    assert _io(configs["text_encoder"], "input") == {"input_ids": ("TYPE_INT32", [77])}
    assert _io(configs["text_encoder"], "output") == {"hidden_states": ("TYPE_FP32", [77, 32])}
    assert _io(configs["text_encoder_2"], "output") == {
        "hidden_states": ("TYPE_FP32", [77, 64]),
        "text_embeds": ("TYPE_FP32", [64]),
    }
    assert _io(configs["vae_decoder"], "input") == {"latents": ("TYPE_FP32", [4, -1, -1])}
    assert _io(configs["vae_decoder"], "output") == {"image": ("TYPE_UINT8", [-1, -1, 3])}
    assert _io(configs["sdxl"], "output") == {
        "image": ("TYPE_UINT8", [-1, -1, 3]),
        "used_seed": ("TYPE_INT64", [1]),
        "truncated": ("TYPE_BOOL", [1]),
    }
    ensemble_inputs = {t.name: t.optional for t in configs["sdxl"].input}
    # All optional, `prompt` too: a missing prompt must reach the tokenizer, which names it in an
    # INVALID_ARG error (tritonserver 2.51's ensemble only reports an unnamed deadlock).
    names = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale")
    image_inputs = ("input_image", "strength", "first_pass_size")
    assert ensemble_inputs == dict.fromkeys((*names, "seed", "scheduler", *image_inputs), True)
    assert configs["tokenizer"].input[0].name == "prompt" and configs["tokenizer"].input[0].optional
    assert check_ensemble(configs["sdxl"], configs) == []
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, VAE_DECODER, "vae_encoder", *ALL_VAE_ENGINES, "tokenizer"):
        assert configs[name].backend == "python" and not configs[name].platform
        assert "platform" not in (cpu_repo / name / "config.pbtxt").read_text()


def test_unet_stage_gets_its_settings_file_and_a_diffusers_directory(cpu_repo: Path) -> None:
    config = _configs(cpu_repo)["unet"]
    assert not config.parameters, "config.pbtxt keeps only what Triton reads"
    stage = StageConfig.from_json_file(cpu_repo / "unet" / "1" / STAGE_CONFIG_NAME)
    assert stage.placement == Placement(ranks=2, threads_per_rank=1)
    assert stage.engine == DistriConfig(mode="full_sync", warmup_steps=2, device="cpu")
    assert stage.engine.dtype == "fp32" and stage.engine.cuda_graphs is False
    requests = stage.requests
    assert (requests.max_width, requests.max_height, requests.min_width) == (512, 512, 1)
    assert (requests.default_width, requests.default_height, requests.default_steps) == (512, 512, 30)
    assert stage.warmup == ((512, 512),)
    (group,) = config.instance_group
    assert group.kind == ModelInstanceGroup.KIND_MODEL and group.count == 1
    # The queue bound: 2 full batches (of 3, the largest --batch-sizes) for the one instance.
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 2 * 3 * 1

    model = cpu_repo / "unet" / "1" / "model"
    # The tiny model's VAE has SDXL's configuration: the published latent-to-RGB map, for previews.
    assert sorted(p.name for p in model.iterdir()) == [
        "latent_rgb.json",
        "model_index.json",
        "scheduler",
        "unet",
        "vae",  # its config only: image-to-image reads the latent scaling
    ]
    assert [p.name for p in (model / "vae").iterdir()] == ["config.json"]
    assert LatentToRgb.load(model) == LatentToRgb.sdxl()
    index = json.loads((model / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["scheduler"][0] == "diffusers"
    assert index["vae"] == [None, None] and index["text_encoder_2"] == [None, None]
    from diffusers import DiffusionPipeline

    # As the UNet stage loads it: the other components are served by other models.
    skipped = dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"))
    loaded = DiffusionPipeline.from_pretrained(model, **skipped)
    assert loaded.unet is not None and loaded.text_encoder is None and loaded.vae is None


def test_manifest_records_the_checks(cpu_repo: Path) -> None:
    manifest = json.loads((cpu_repo / "build_manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["max_batch_size"] == 3
    assert manifest["stages"][VAE_DECODER]["decode_settings"]["tile"] == 128  # the VAE's sample_size / 8
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, *ALL_VAE_ENGINES):
        check = manifest["stages"][name]["onnx_check"]
        assert all(err <= check["limit"][out] for out, err in check["max_abs_error"].items())
    assert manifest["stages"]["unet"]["stage_config"]["placement"] == {"ranks": 2, "threads_per_rank": 1}
    # The cpu graphs pass TensorRT's parser rules too, but for ONNX Runtime's fused attention, the
    # declared stand-in of the VAE's (the gpu target exports it as MatMul, Softmax, MatMul).
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, *ALL_VAE_ENGINES):
        fused = ["com.microsoft.MultiHeadAttention"] if name in ALL_VAE_ENGINES else []
        assert manifest["stages"][name]["tensorrt_parser_rules"] == {
            "passed": True,
            "stand_ins": fused,
            "element_limit_checked_at": None,
        }


# --- the GPU target ---------------------------------------------------------------------------------


def test_the_gpu_build_hands_tensorrt_graphs_its_parser_takes(gpu_build: tuple[Path, dict]) -> None:
    """The whole-latent VAE graph had a UINT8 intermediate tensor, which TensorRT's parser refuses:
    the gpu build stopped after the text encoders. Every graph is now checked against the parser's
    rules in the build, at its engine profile's largest shapes."""
    repo, profiles = gpu_build
    assert set(profiles) == {TEXT_ENCODER, TEXT_ENCODER_2, *ALL_VAE_ENGINES}
    manifest = json.loads((repo / "build_manifest.json").read_text())
    for name, profile in profiles.items():
        rules = manifest["stages"][name]["tensorrt_parser_rules"]
        assert rules["passed"] and rules["stand_ins"] == []
        assert rules["element_limit_checked_at"] == {
            n: list(shapes[2]) for n, shapes in profile.shapes.items()
        }


def test_every_tensorrt_model_gets_one_instance_on_the_first_gpu_of_each_unet_group(
    gpu_build: tuple[Path, dict],
) -> None:
    """KIND_GPU without a gpus list starts an instance on every GPU the server sees: 5 engines x 4
    GPUs, each reserving its profile's largest shapes beside the UNet ranks."""
    configs = check_repository(gpu_build[0])
    for name in (TEXT_ENCODER, TEXT_ENCODER_2, *ALL_VAE_ENGINES):
        (group,) = configs[name].instance_group
        assert configs[name].platform == "tensorrt_plan"
        assert (group.kind, list(group.gpus), group.count) == (ModelInstanceGroup.KIND_GPU, [0, 2], 1), name
    assert configs["unet"].instance_group[0].count == 2


def test_a_build_that_names_only_its_largest_size_serves_the_native_one_by_default(
    tiny_sdxl_dir: Path, gpu_build: tuple[Path, dict]
) -> None:
    """--max-resolution alone made the largest size every request's default and the warm-up's
    (3072 x 3072 in the CPU repository, whose first request failed at the step deadline)."""
    from build_engines.build import build_sizes

    def sizes(*flags: str) -> tuple:
        target = [] if "--target" in flags else ["--target", "cpu"]
        args = build_parser().parse_args(["--model", "m", "--output", "o", *target, *flags])
        maximum = (
            parse_resolutions(args.max_resolution, "--max-resolution")[0] if args.max_resolution else None
        )
        return build_sizes(args, tiny_sdxl_dir, maximum)

    native = (1024, 1024)  # the tiny model's UNet sample_size (128) x the VAE's 8, as SDXL's
    assert sizes("--max-resolution", "4096x4096") == ([native], (4096, 4096))
    assert sizes("--max-resolution", "512x768") == ([(512, 768)], (512, 768))
    assert sizes("--target", "gpu") == ([native], native)
    assert sizes("--resolutions", "768x768") == ([(768, 768)], None)
    stage = StageConfig.from_json_file(gpu_build[0] / "unet" / "1" / STAGE_CONFIG_NAME)
    requests = stage.requests
    assert (requests.default_width, requests.default_height) == native
    assert (requests.max_width, requests.max_height) == (2048, 2048) and stage.warmup == (native,)


def test_gpu_target_fails_clearly_without_tensorrt(tiny_sdxl_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "repo"
    code = main(["--model", str(tiny_sdxl_dir), "--output", str(output), "--target", "gpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the TensorRT Python module `tensorrt` cannot be imported" in err
    assert "no NVIDIA GPU is visible" in err
    assert "--target cpu" in err
    assert not output.exists()


def test_preflight_names_only_what_is_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.99.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(trt_build.TensorRTUnavailable) as raised:
        trt_build.preflight()
    assert "tensorrt` cannot be imported" not in str(raised.value)
    assert "no NVIDIA GPU is visible" in str(raised.value)


def test_gpu_configs_use_tensorrt_plans_with_the_same_tensors() -> None:
    from distrifusion.export import text_encoder_2_spec, text_encoder_spec, vae_decoder_spec

    specs = {
        TEXT_ENCODER: text_encoder_spec(77, 768),
        TEXT_ENCODER_2: text_encoder_2_spec(77, 1280, 1280),
        VAE_WHOLE: vae_decoder_spec(4, VAE_WHOLE),
        VAE_TILE_STATISTICS: tile_statistics_spec(4, 30, 32),
        VAE_TILES: tile_decoder_spec(4, 30, 32),
    }
    configs = {
        name: stage_config(load_template(TEMPLATES_DIR, name), spec, 4, "tensorrt_plan", "KIND_GPU", (0, 2))
        for name, spec in specs.items()
    }
    configs[VAE_DECODER] = stage_config(
        load_template(TEMPLATES_DIR, VAE_DECODER), vae_decoder_spec(4), 4, None, "KIND_CPU"
    )
    configs["tokenizer"] = stage_config(
        load_template(TEMPLATES_DIR, "tokenizer"), tokenizer_spec(77), 4, None, "KIND_CPU"
    )
    configs["unet"] = unet_config(load_template(TEMPLATES_DIR, "unet"), 4, 2, 16)
    assert configs["unet"].dynamic_batching.default_queue_policy.max_queue_size == 16
    configs["sdxl"] = load_template(TEMPLATES_DIR, "sdxl")
    assert check_ensemble(configs["sdxl"], configs) == []
    for name in specs:
        assert configs[name].platform == "tensorrt_plan" and not configs[name].backend
        assert "backend" not in format_config(configs[name])
        (group,) = configs[name].instance_group
        # One instance on each listed GPU: without the list Triton would start one on every GPU.
        assert group.kind == ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 2] and group.count == 1
        assert validate_config(configs[name]) == []
    with pytest.raises(RepositoryError, match="KIND_GPU instance group needs its GPUs listed"):
        stage_config(
            load_template(TEMPLATES_DIR, VAE_WHOLE), specs[VAE_WHOLE], 1, "tensorrt_plan", "KIND_GPU"
        )
    assert _io(configs[TEXT_ENCODER_2], "output")["hidden_states"] == ("TYPE_FP32", [77, 1280])
    assert configs["unet"].instance_group[0].count == 2


def test_tensorrt_profiles_span_the_requested_batches_and_sizes() -> None:
    from distrifusion.export import text_encoder_spec, vae_decoder_spec

    profile = trt_build.encoder_profile(text_encoder_spec(77, 768), [1, 2, 4])
    assert profile.shapes == {"input_ids": ((1, 77), (1, 77), (4, 77))}
    sdxl_vae = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}
    settings = dataclasses.replace(
        DecodeSettings.derive(sdxl_vae, 16 * 2**30, tensorrt=True), whole_max_latent=(192, 200)
    )
    requests = RequestSettings(min_width=512, min_height=512, max_width=4096, max_height=4096)
    sizes = [(1024, 1024), (2048, 1536)]
    profile = trt_build.vae_engine_profile(vae_decoder_spec(4, VAE_WHOLE), settings, requests, sizes)
    assert profile.shapes == {"latents": ((1, 4, 64, 64), (1, 4, 128, 128), (1, 4, 192, 200))}
    tiles = settings.tiles_per_call
    profile = trt_build.vae_engine_profile(tile_decoder_spec(4, 30, 32), settings, requests, sizes)
    assert profile.shapes == {
        "latents": ((1, 4, 64, 64), (tiles, 4, 128, 128), (tiles, 4, 128, 128)),
        "statistics": ((1, 30, 32, 3), (tiles, 30, 32, 3), (tiles, 30, 32, 3)),
    }
    assert trt_build.stage_precision(TEXT_ENCODER) and not trt_build.stage_precision(VAE_WHOLE)


def _gpu_stage(*flags: str, resolutions: str = "1024x1024,2048x1536", gpus: int = 4) -> StageConfig:
    from build_engines.build import parse_resolutions

    args = build_parser().parse_args(["--model", "m", "--output", "o", "--target", "gpu", *flags])
    sizes = parse_resolutions(resolutions)
    largest = (max(w for w, _ in sizes), max(h for _, h in sizes))
    return unet_stage_config(args, sizes, largest, gpus)


def test_gpu_builds_serve_with_cuda_graphs_unless_told_not_to() -> None:
    stage = _gpu_stage("--unet-gpus", "0,1;2,3")
    assert stage.engine.device == "cuda" and stage.engine.cuda_graphs and stage.engine.dtype == "fp16"
    assert stage.placement.gpus == ((0, 1), (2, 3)) and stage.placement.instances == 2
    assert stage.placement.engine_gpus == (0, 2)
    assert not _gpu_stage("--no-cuda-graphs").engine.cuda_graphs
    every_gpu = _gpu_stage()
    assert every_gpu.placement.gpus == ((0, 1, 2, 3),)


def test_a_cpu_build_may_put_its_unet_on_gpus() -> None:
    """ONNX Runtime engines on the CPU, the UNet on GPUs: what a GPU machine without TensorRT serves
    (the GPU check's served request)."""
    from build_engines.build import parse_resolutions

    args = build_parser().parse_args(["--model", "m", "--output", "o", "--target", "cpu", "--unet-gpus", "0"])
    stage = unet_stage_config(args, parse_resolutions("512x512"), None, 0)
    assert stage.placement.gpus == ((0,),) and stage.engine.device == "cuda" and stage.engine.cuda_graphs
    assert stage.placement.engine_gpus == (0,)


def test_gpu_requests_are_bounded_by_the_vae_profile() -> None:
    requests = _gpu_stage().requests
    # The VAE engine's profile spans the resolutions; smaller sizes would fail in TensorRT only
    # after every GPU denoised them.
    assert (requests.min_width, requests.min_height) == (1024, 1024)
    assert (requests.max_width, requests.max_height) == (2048, 1536)
    assert (requests.default_width, requests.default_height) == (1024, 1024)
    assert _gpu_stage().warmup == ((1024, 1024), (2048, 1536))
    assert _gpu_stage("--warmup-resolutions", "none").warmup == ()
    wider = _gpu_stage("--min-resolution", "512x512").requests
    assert (wider.min_width, wider.min_height) == (512, 512)


def test_the_stage_config_round_trips_and_names_unknown_settings(tmp_path: Path) -> None:
    stage = _gpu_stage(
        "--unet-gpus", "0,1", "--mode", "sync_gn", "--comm-batch-size", "30", "--step-deadline-s", "7"
    )
    assert StageConfig.from_dict(json.loads(stage.to_json_string())) == stage
    assert stage.faults.step_deadline_s == 7
    for broken, message in (
        ({"engine": {"cuda_graph": True}}, "engine.cuda_graph: unknown setting"),
        ({"enigne": {}}, "enigne: unknown setting"),
        ({"requests": {"max_widht": 1}}, "requests.max_widht: unknown setting"),
        ({"engine": {"mode": "warp"}}, "engine.mode: unknown mode 'warp'"),
        ({"placement": {"gpus": [[0, 1], [1, 2]]}}, "placement.gpus: a GPU appears in more than one place"),
        ({"placement": {"gpus": [[0, 1], [2]]}}, "placement.gpus: every instance needs the same number"),
        ({"placement": {"gpus": [[0]], "ranks": 2}}, "'ranks' and 'threads_per_rank' are for the CPU"),
        ({"engine": {"split_batch": True}, "placement": {"ranks": 3}}, "engine.split_batch: needs an even"),
        ({"requests": {"max_width": 512}}, "requests.default_width: must be an integer from 1 to 512"),
        ({"engine": {"warmup_steps": True}}, "engine.warmup_steps: must be an integer >= 0"),
        ({"faults": {"max_rebuild": 1}}, "faults.max_rebuild: unknown setting"),
        ({"faults": {"step_deadline_s": 0}}, "faults.step_deadline_s: must be a number of seconds > 0"),
        ({"faults": {"step_deadline_s": 500}}, "faults.collective_timeout_s: must exceed step_deadline_s"),
        (
            {"engine": {"compile": "xla"}},
            "engine.compile: unknown torch.compile backend 'xla'; allowed: true",
        ),
        (
            {"engine": {"compile": True}, "warmup": [[64 * n, 64] for n in range(1, 10)]},
            "warmup: at most 8 sizes with engine.compile",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            StageConfig.from_dict(broken)
    path = tmp_path / STAGE_CONFIG_NAME
    path.write_text('{"engine": {"mode": "full_sync"}, "requests": {"default_steps": 0}}')
    with pytest.raises(
        ConfigError, match=r"stage_config.json: requests.default_steps: must be an integer >= 1"
    ):
        StageConfig.from_json_file(path)


def test_a_step_that_compiles_gets_the_compile_deadline() -> None:
    policy = FaultPolicy(step_deadline_s=3.0, collective_timeout_s=60.0, compile_deadline_s=900.0)
    assert policy.deadline(None) == 3.0 and policy.deadline(None, compiling=True) == 900.0
    assert policy.deadline(200.0, compiling=True) == 2000.0  # 10 x a slow median step is longer


def test_the_stage_refuses_instances_and_gpus_it_does_not_have() -> None:
    placement = Placement(gpus="0,1;2,3")
    assert placement.instance_gpus(1, available=4) == (2, 3)
    with pytest.raises(ConfigError, match=r"names GPU\(s\) \[2, 3\] this machine lacks \(it has 2\)"):
        placement.instance_gpus(1, available=2)
    with pytest.raises(ConfigError, match="2 group\\(s\\) in '0,1;2,3', but this is instance 2"):
        placement.instance_gpus(2, available=4)


# --- consistency checks and arguments ---------------------------------------------------------------


def _template_configs() -> dict[str, ModelConfig]:
    from distrifusion.export import text_encoder_2_spec, text_encoder_spec, vae_decoder_spec

    specs = {
        TEXT_ENCODER: text_encoder_spec(77, 32),
        TEXT_ENCODER_2: text_encoder_2_spec(77, 64, 64),
        VAE_DECODER: vae_decoder_spec(4),
        "tokenizer": tokenizer_spec(77),
    }
    configs = {
        name: stage_config(load_template(TEMPLATES_DIR, name), spec, 4, None, "KIND_CPU")
        for name, spec in specs.items()
    }
    configs["unet"] = load_template(TEMPLATES_DIR, "unet")
    configs["sdxl"] = load_template(TEMPLATES_DIR, "sdxl")
    return configs


def test_check_ensemble_finds_inconsistencies() -> None:
    configs = _template_configs()
    assert check_ensemble(configs["sdxl"], configs) == []

    def errors_after(edit) -> list[str]:
        changed = _copy(configs["sdxl"])
        models = {**configs, "sdxl": changed}
        edit(changed, models)
        return check_ensemble(changed, models)

    def seed_output_named_seed(msg, _):
        # An ensemble output named like a request input is that input (Triton then hangs).
        for out in msg.output:
            if out.name == "used_seed":
                out.name = "seed"
        for step in msg.ensemble_scheduling.step:
            for key, value in step.output_map.items():
                if value == "used_seed":
                    step.output_map[key] = "seed"

    assert any("'seed' is already produced by the request" in e for e in errors_after(seed_output_named_seed))

    def wrong_dtype(_, models):
        models["text_encoder"] = _copy(models["text_encoder"])
        models["text_encoder"].input[0].data_type = DataType.TYPE_INT64

    assert any("is TYPE_INT64" in e for e in errors_after(wrong_dtype))

    def wrong_dims(_, models):
        models["vae_decoder"] = _copy(models["vae_decoder"])
        models["vae_decoder"].input[0].dims[:] = [8, -1, -1]

    assert any("has dims [8, -1, -1]" in e for e in errors_after(wrong_dims))

    def small_batch(_, models):
        models["unet"] = _copy(models["unet"])
        models["unet"].max_batch_size = 1

    assert any("allows batch 1" in e for e in errors_after(small_batch))

    def unused_input(msg, _):
        msg.input.add(name="extra", data_type=DataType.TYPE_INT32, dims=[1], optional=True)

    assert any("'extra' is not used" in e for e in errors_after(unused_input))

    def required_from_optional(_, models):
        # `prompt` is optional in the ensemble so that the tokenizer can reject its absence.
        models["tokenizer"] = _copy(models["tokenizer"])
        models["tokenizer"].input[0].ClearField("optional")

    assert any("required input 'prompt'" in e for e in errors_after(required_from_optional))

    def missing_model(_, models):
        del models["unet"]

    assert any("no model 'unet'" in e for e in errors_after(missing_model))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "cpu", "--unet-gpus", "0", "--threads-per-rank", "2"], "--threads-per-rank"),
        (["--target", "cpu", "--resolutions", "1000x1000"], "not multiples of 32"),
        (["--target", "cpu", "--resolutions", "1024"], "WIDTHxHEIGHT"),
        (["--target", "cpu", "--split-batch", "--unet-ranks", "3"], "split_batch: needs an even number"),
        (["--target", "cpu", "--cuda-graphs"], "cuda_graphs: CUDA graphs need device='cuda'"),
        (["--target", "cpu", "--default-resolution", "520x512"], "not multiples of 32"),
        (["--target", "cpu", "--max-resolution", "512x512", "--warmup-resolutions", "1024x1024"], "warmup"),
        (["--target", "cpu", "--unet-ranks", "0"], "placement.ranks: must be an integer >= 1"),
        (["--target", "cpu", "--mode", "warp"], "mode"),
        (["--target", "cpu", "--batch-sizes", "0"], "--batch-sizes"),
        (["--target", "cpu", "--max-resolution", "512x512", "--resolutions", "1024x1024"], "exceed"),
        (["--target", "cpu", "--max-queue-size", "0"], "--max-queue-size must be at least 1"),
    ],
)
def test_bad_arguments_exit_2(tiny_sdxl_dir: Path, tmp_path: Path, capsys, extra, message) -> None:
    code = main(["--model", str(tiny_sdxl_dir), "--output", str(tmp_path / "repo"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_existing_output_needs_force(tiny_sdxl_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "keep").write_text("x")
    code = main(["--model", str(tiny_sdxl_dir), "--output", str(tmp_path / "repo"), "--target", "cpu"])
    assert code == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "repo" / "keep").read_text() == "x"


def test_unet_weight_variant_is_copied_under_the_default_names(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text("{}")
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    index |= {"scheduler": ["diffusers", "EulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"]}
    (model / "model_index.json").write_text(json.dumps(index))
    (model / "unet" / "config.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_text("fp32")
    for shard in (1, 2):
        (model / "unet" / f"diffusion_pytorch_model.fp16-0000{shard}-of-00002.safetensors").write_text("16")
    weight_map = {"a": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    dest = tmp_path / "dest"
    copy_unet_model(model, dest, variant="fp16")
    names = sorted(p.name for p in (dest / "unet").iterdir())
    assert "diffusion_pytorch_model-00001-of-00002.safetensors" in names
    assert "diffusion_pytorch_model.safetensors" not in names  # the fp32 file is not copied
    copied_index = json.loads((dest / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert copied_index["weight_map"] == {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}
    assert json.loads((dest / "model_index.json").read_text())["vae"] == [None, None]
    plain = tmp_path / "plain"
    copy_unet_model(model, plain)
    assert (plain / "unet" / "diffusion_pytorch_model.safetensors").read_text() == "fp32"


def test_config_text_round_trip_of_every_template() -> None:
    for path in TEMPLATES_DIR.glob("*/config.pbtxt"):
        parsed = parse_config(path.read_text())
        assert parse_config(format_config(parsed)) == parsed, path
        assert validate_config(parsed) == [], path
    text = (
        'name: "a\\"b\\n\\303\\251" max_batch_size: -1 # comment\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, -1 ] } ]\n'
        'sequence_batching { control_input [ { name: "c" control [ { fp32_false_true: [ 0, 1.5e3 ] } ] } ] }'
    )
    msg = parse_config(text)
    assert msg.name == 'a"b\né' and msg.max_batch_size == -1
    assert list(msg.input[0].dims) == [1, -1]
    assert list(msg.sequence_batching.control_input[0].control[0].fp32_false_true) == [0.0, 1500.0]
    written = format_config(msg, header="first line\nsecond line")
    assert written.startswith("# first line\n# second line\n")
    assert parse_config(written) == msg
    with pytest.raises(text_format.ParseError):
        parse_config("input [ { name: 'x' }")
    with pytest.raises(text_format.ParseError, match="bogus"):
        parse_config('name: "m" backend: "python" bogus: 1')
    with pytest.raises(text_format.ParseError, match="TYPE_BOGUS"):
        parse_config('name: "m" backend: "python" input { name: "x" data_type: TYPE_BOGUS dims: 1 }')
    missing = validate_config(
        parse_config('input { name: "x" } input { name: "x" dims: 1 data_type: TYPE_BOOL }')
    )
    assert "name: missing" in missing and "neither platform nor backend is set" in missing
    assert "input 'x': data_type and dims are required" in missing
    assert any("duplicate tensor names" in e for e in missing)


def test_repository_check_reports_schema_errors(cpu_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo / "unet", repo / "unet", ignore=shutil.ignore_patterns("model"))
    config = repo / "unet" / "config.pbtxt"
    config.write_text(config.read_text() + "bogus_field: 1\n")
    with pytest.raises(RepositoryError, match="bogus_field"):
        check_repository(repo)
