"""The TensorRT ONNX parser's rules, as the build checks them on every exported graph: each rule
against a small graph that breaks it (ONNX Runtime runs every one of these), and the graphs the
build exports for the gpu target, at the largest shapes of their engine profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from build_engines.parser_rules import FUSED_ATTENTION, check_graph, load_rules
from distrifusion.export import VAE_WHOLE, VaeDecoderExport, export_stage, vae_decoder_spec

FLOAT, UINT8 = TensorProto.FLOAT, TensorProto.UINT8


def save(
    path: Path, nodes: list, inputs: list, outputs: list, initializers: list = (), opset: int = 17
) -> Path:
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=imports
    )
    onnx.save(model, str(path))
    return path


def value(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def constant(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def rules_broken(path: Path, **kwargs) -> set[str]:
    return {violation.rule for violation in check_graph(path, **kwargs)}


def test_a_uint8_tensor_only_at_the_networks_edge(tmp_path: Path) -> None:
    """What the whole-latent VAE graph exported as Round -> Cast(UINT8) -> Transpose: ONNX Runtime
    runs it, TensorRT's parser refuses the UINT8 intermediate (and Transpose on UINT8)."""
    x, y = value("x", FLOAT, [1, 3, 4, 4]), value("y", UINT8, [1, 4, 4, 3])
    inside = save(tmp_path / "inside.onnx", [
        helper.make_node("Round", ["x"], ["r"]),
        helper.make_node("Cast", ["r"], ["u"], to=UINT8),
        helper.make_node("Transpose", ["u"], ["y"], perm=[0, 2, 3, 1]),
    ], [x], [y])  # fmt: skip
    violations = check_graph(inside)
    assert {v.rule for v in violations} == {"tensor type", "operator type"}
    assert any("tensor u: is UINT8 (an intermediate tensor)" in str(v) for v in violations)
    assert all(v.source for v in violations), "every rule names its source"
    last = save(tmp_path / "last.onnx", [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Round", ["t"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=UINT8),
    ], [x], [y])  # fmt: skip
    assert check_graph(last) == []


def test_operators_of_other_domains_only_as_declared_stand_ins(tmp_path: Path) -> None:
    q = [value(n, FLOAT, [2, 16, 8]) for n in ("q", "k", "v")]
    path = save(tmp_path / "mha.onnx", [
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=1),
    ], q, [value("y", FLOAT, [2, 16, 8])])  # fmt: skip
    assert rules_broken(path) == {"operator"}
    assert check_graph(path, stand_ins=FUSED_ATTENTION) == []


@pytest.mark.parametrize(
    ("case", "rule"),
    [
        ("double", "tensor type"),
        ("computed slice axes", "constant input"),
        ("cubic resize", "attribute"),
        ("layer norm statistics used", "first output only"),
        ("opset 21", "opset"),
        ("unsupported operator", "operator"),
    ],
)
def test_each_rule_finds_what_breaks_it(tmp_path: Path, case: str, rule: str) -> None:
    x = value("x", FLOAT, [1, 3, 8, 8])
    y = value("y", FLOAT, None)
    graphs = {
        "double": ([helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
                    helper.make_node("Cast", ["d"], ["y"], to=FLOAT)], []),
        "computed slice axes": ([helper.make_node("Shape", ["x"], ["s"]),
                                 helper.make_node("Slice", ["s", "one", "two"], ["axis"]),
                                 helper.make_node("Sub", ["axis", "three"], ["axes"]),
                                 helper.make_node("Slice", ["x", "zero", "two", "axes"], ["y"])],
                                [constant("zero", [0]), constant("one", [1]), constant("two", [2]),
                                 constant("three", [3])]),
        "cubic resize": ([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic")],
                         [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]),
        "layer norm statistics used": ([helper.make_node("LayerNormalization", ["x", "g", "b"], ["n", "mean"]),
                                        helper.make_node("Add", ["n", "mean"], ["y"])],
                                       [numpy_helper.from_array(np.ones(8, np.float32), "g"),
                                        numpy_helper.from_array(np.zeros(8, np.float32), "b")]),
        "opset 21": ([helper.make_node("Relu", ["x"], ["y"])], []),
        "unsupported operator": ([helper.make_node("Det", ["x"], ["y"])], []),
    }  # fmt: skip
    nodes, initializers = graphs[case]
    path = save(tmp_path / "g.onnx", nodes, [x], [y], initializers, opset=21 if case == "opset 21" else 17)
    assert rule in rules_broken(path), check_graph(path)


def test_every_tensor_stays_within_int32_elements_at_the_profiles_largest_shape(tmp_path: Path) -> None:
    """Attention's score matrix [tokens, tokens]: 46341 tokens make 2^31 + 5e4 elements."""
    tokens = value("tokens", FLOAT, ["batch", "n", 8])
    path = save(tmp_path / "scores.onnx", [
        helper.make_node("Transpose", ["tokens"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["tokens", "t"], ["y"]),
    ], [tokens], [value("y", FLOAT, ["batch", "n", "n"])])  # fmt: skip
    assert check_graph(path, {"tokens": [1, 46340, 8]}) == []
    (violation,) = check_graph(path, {"tokens": [1, 46341, 8]})
    assert violation.rule == "element limit" and "tensor y" in violation.where
    assert f"{load_rules()['element_limit']['max_elements']:,}" in violation.message


class _UInt8BeforeTranspose(VaeDecoderExport):
    """The whole-latent VAE graph as it was exported until the TensorRT rules were checked."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(self.unscale(latents), return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1) * 255
        return image.round().to(torch.uint8).permute(0, 2, 3, 1)


@pytest.mark.parametrize("wrapper", [VaeDecoderExport, _UInt8BeforeTranspose])
def test_the_whole_vae_graph_passes_and_its_old_export_did_not(
    tiny_sdxl_dir: Path, tmp_path: Path, wrapper
) -> None:
    from diffusers import AutoencoderKL

    module = wrapper(AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae")).eval()
    spec = vae_decoder_spec(4, VAE_WHOLE)
    example = {"latents": np.zeros((2, 4, 8, 8), np.float32)}
    exported = export_stage(module, spec, tmp_path / "model.onnx", example)
    broken = rules_broken(exported.path, max_input_shapes={"latents": [1, 4, 64, 64]})
    assert broken == (set() if wrapper is VaeDecoderExport else {"tensor type", "operator type"})
