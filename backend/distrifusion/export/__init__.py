"""ONNX export of the SDXL stages that are served outside the UNet: both text encoders, the VAE decoder.

``wrappers``: the torch modules that are exported; ``specs``: the tensor contract (names, types,
dims); ``onnx_export``: export, ONNX Runtime check against PyTorch. No Triton imports here: the
model repository generator (``build_engines``) and the tests use this package.
"""

from .onnx_export import (
    DEFAULT_OPSET,
    CheckResult,
    ExportedStage,
    check_stage,
    export_stage,
    load_components,
    ort_session,
    run_ort,
    stage_modules,
    text_encoder_cases,
    vae_decoder_cases,
    verify_onnx_io,
)
from .specs import (
    ONNX_STAGES,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    VAE_DECODER,
    VAE_ENGINES,
    VAE_TILE_STATISTICS,
    VAE_TILES,
    VAE_WHOLE,
    StageSpec,
    TensorSpec,
    text_encoder_2_spec,
    text_encoder_spec,
    vae_decoder_spec,
)
from .wrappers import ExportError, TextEncoderExport, VaeDecoderExport, latent_statistics

__all__ = [
    "DEFAULT_OPSET",
    "ONNX_STAGES",
    "TEXT_ENCODER",
    "TEXT_ENCODER_2",
    "VAE_DECODER",
    "VAE_ENGINES",
    "VAE_TILES",
    "VAE_TILE_STATISTICS",
    "VAE_WHOLE",
    "CheckResult",
    "ExportError",
    "ExportedStage",
    "StageSpec",
    "TensorSpec",
    "TextEncoderExport",
    "VaeDecoderExport",
    "check_stage",
    "export_stage",
    "latent_statistics",
    "load_components",
    "ort_session",
    "run_ort",
    "stage_modules",
    "text_encoder_2_spec",
    "text_encoder_cases",
    "text_encoder_spec",
    "vae_decoder_cases",
    "vae_decoder_spec",
    "verify_onnx_io",
]
