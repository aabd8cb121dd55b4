"""Tests of the CLIP vocabulary and the tiny SDXL / SD 1.5 pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from distrifusion.cli.tiny_model import main as tiny_model_main
from distrifusion.clip_vocab import (
    VOCAB_SIZE,
    bytes_to_unicode,
    clip_tokenizer,
    load_clip_bpe,
    save_clip_tokenizer,
)
from distrifusion.tiny_model import (
    build_tiny_sd15,
    build_tiny_sdxl,
    norm_groups,
    sdxl_unet_config,
)

# Token ids of the real openai/clip-vit-large-patch14 tokenizer.
CAT_PROMPT = "a photo of a cat"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _state_dicts(pipe: object) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: getattr(pipe, name).state_dict() for name in COMPONENTS if getattr(pipe, name, None) is not None
    }


# Set by transformers on save/load, not part of the architecture.
_SAVE_ONLY_KEYS = {"dtype", "torch_dtype", "architectures", "transformers_version"}


def _public_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _SAVE_ONLY_KEYS}


def _assert_same_weights(a: object, b: object) -> None:
    """Bit-identical weights and equal configs, component by component."""
    for name in (*COMPONENTS, "scheduler"):
        if getattr(a, name, None) is not None:
            ca, cb = getattr(a, name).config, getattr(b, name).config
            if not isinstance(ca, dict):  # transformers configs
                ca, cb = ca.to_dict(), cb.to_dict()
            assert _public_config(ca) == _public_config(cb), name
    sa, sb = _state_dicts(a), _state_dicts(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for key, tensor in sa[name].items():
            assert torch.equal(tensor, sb[name][key]), f"{name}.{key}"


def test_vocab_is_real_clip() -> None:
    vocab, merges = load_clip_bpe()
    assert len(vocab) == VOCAB_SIZE
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320
    assert len(set(bytes_to_unicode().values())) == 256


def test_tokenizer_matches_clip_ids(tmp_path: Path) -> None:
    assert clip_tokenizer()(CAT_PROMPT).input_ids == CAT_IDS
    from_files = save_clip_tokenizer(tmp_path / "tok", pad_token="!")
    written = {p.name for p in (tmp_path / "tok").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= written
    assert len(from_files) == VOCAB_SIZE
    padded = from_files(CAT_PROMPT, padding="max_length", max_length=77).input_ids
    assert padded[:7] == CAT_IDS and padded[7:] == [0] * 70


def test_sdxl_tokenizers_pad_like_sdxl() -> None:
    pipe = build_tiny_sdxl()
    for tokenizer, pad_id in ((pipe.tokenizer, 49407), (pipe.tokenizer_2, 0)):
        ids = tokenizer(CAT_PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert tokenizer.model_max_length == 77
        assert ids[:7] == CAT_IDS and ids[7:] == [pad_id] * 70


def test_sdxl_structure() -> None:
    pipe = build_tiny_sdxl()
    unet = pipe.unet.config
    assert unet.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.up_block_types == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet.layers_per_block == 2 and unet.sample_size == 128
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert te1.num_hidden_layers >= 2 and te2.num_hidden_layers >= 2
    assert te1.vocab_size == te2.vocab_size == 49408
    assert te1.max_position_embeddings == te2.max_position_embeddings == 77
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.vae.config.force_upcast
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.config.force_zeros_for_empty_prompt


def test_wider_unet_derives_heads_and_groups() -> None:
    config = sdxl_unet_config(block_out_channels=(128, 256, 512))
    # Head width 64 and 32 groups, as in the real SDXL UNet.
    assert config["attention_head_dim"] == [2, 4, 8]
    assert config["norm_num_groups"] == 32
    assert norm_groups((32, 64, 128)) == 8
    assert norm_groups((320, 640, 1280)) == 32


def test_determinism_and_caller_rng_untouched() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = build_tiny_sdxl(seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    _assert_same_weights(first, build_tiny_sdxl(seed=0))
    other = build_tiny_sdxl(seed=1)
    for name, state in _state_dicts(first).items():
        changed = [k for k, t in state.items() if t.numel() > 1 and t.std() > 0]
        assert any(not torch.equal(state[k], getattr(other, name).state_dict()[k]) for k in changed), name


def test_sdxl_round_trip_bit_identical(tiny_sdxl_dir: Path) -> None:
    assert (tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sdxl_dir / "tokenizer_2" / "merges.txt").is_file()
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    _assert_same_weights(build_tiny_sdxl(seed=0), loaded)
    assert loaded.tokenizer(CAT_PROMPT).input_ids == CAT_IDS
    assert loaded.tokenizer_2.pad_token_id == 0


def test_sd15_round_trip_bit_identical(tiny_sd15_dir: Path) -> None:
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    _assert_same_weights(build_tiny_sd15(seed=0), loaded)
    assert isinstance(loaded.scheduler, PNDMScheduler)
    assert loaded.safety_checker is None
    unet = loaded.unet.config
    assert unet.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert not unet.use_linear_projection and unet.addition_embed_type is None
    assert unet.cross_attention_dim == loaded.text_encoder.config.hidden_size
    assert loaded.vae_scale_factor == 8 and loaded.vae.config.scaling_factor == 0.18215


def test_loads_offline_in_fresh_process(tiny_sdxl_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import huggingface_hub.constants
        from diffusers import StableDiffusionXLPipeline
        assert huggingface_hub.constants.HF_HUB_OFFLINE
        pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
        print(json.dumps({n: sum(t.double().sum().item() for t in getattr(pipe, n).state_dict().values())
                          for n in ("unet", "vae", "text_encoder", "text_encoder_2")}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_sdxl_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sums = json.loads(result.stdout.strip().splitlines()[-1])
    expected = build_tiny_sdxl(seed=0)
    for name, value in sums.items():
        # Same summation order in both processes: equal only if every weight is.
        tensors = getattr(expected, name).state_dict().values()
        assert value == sum(t.double().sum().item() for t in tensors), name


def _run_two_steps(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=CAT_PROMPT,
        num_inference_steps=2,
        height=256,
        width=256,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_loaded_sdxl_runs(tiny_sdxl_dir: Path) -> None:
    latents = _run_two_steps(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir))
    assert latents.shape == (1, 4, 32, 32)
    assert torch.isfinite(latents).all()


def test_loaded_sd15_runs(tiny_sd15_dir: Path) -> None:
    latents = _run_two_steps(StableDiffusionPipeline.from_pretrained(tiny_sd15_dir))
    assert latents.shape == (1, 4, 32, 32)
    assert torch.isfinite(latents).all()


def test_cli_writes_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sd15-seed3"
    assert tiny_model_main([str(out), "--arch", "sd15", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "model_index.json" in printed
    _assert_same_weights(build_tiny_sd15(seed=3), StableDiffusionPipeline.from_pretrained(out))
    with pytest.raises(SystemExit):
        tiny_model_main([str(out), "--arch", "sd3"])
