"""What TensorRT's ONNX parser refuses, checked on every exported graph before any engine is built.

ONNX Runtime, which runs the graphs on the CPU and checks them against PyTorch, accepts graphs that
TensorRT's parser refuses (a UINT8 intermediate tensor, a ``com.microsoft`` operator, a tensor over
INT32_MAX elements). The rules are data, ``tensorrt_parser_rules.json`` beside this file, each with
its source; :func:`check_graph` reads a graph against them:

- tensor types: where each ONNX type may appear (UINT8 only as a network input or output);
- operators: each node's operator is in the support matrix, for the type of its first input (and,
  for ``Cast``, its target type); inputs that must be initializers are; attributes are supported
  values; of ``LayerNormalization`` only the first output is used;
- the opset is one TensorRT parses;
- element limit (given the profile's largest input shapes): every tensor of the graph, by ONNX
  Runtime's symbolic shape inference at those shapes, stays within INT32_MAX elements.

Operators of other domains fail unless the caller names them as declared stand-ins (the CPU
target's fused attention).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

RULES_FILE = Path(__file__).resolve().parent / "tensorrt_parser_rules.json"
FUSED_ATTENTION = frozenset({"com.microsoft.MultiHeadAttention"})
"""The stand-in of the cpu target's VAE graphs (:mod:`distrifusion.export.attention`)."""

# onnx.TensorProto data types, by the names the support matrix uses.
_TYPE_NAMES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "DOUBLE",
    16: "BF16",
    17: "FP8",
    18: "FP8",
    19: "FP8",
    20: "FP8",
    22: "INT4",
}


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    """``opset``, ``tensor type``, ``operator``, ``operator type``, ``constant input``, ``attribute``,
    ``first output only``, ``element limit``."""
    where: str
    message: str
    source: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message} [{self.rule}; {self.source}]"


@functools.cache
def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def _type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type, f"ONNX type {elem_type}")


def _node_name(node: Any) -> str:
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"node {node.name or '(unnamed)'} ({domain}{node.op_type})"


def check_graph(
    path: str | Path,
    max_input_shapes: Mapping[str, Sequence[int]] | None = None,
    stand_ins: Collection[str] = (),
    rules: Mapping[str, Any] | None = None,
) -> list[Violation]:
    """Every rule the graph at ``path`` breaks (empty: TensorRT's parser takes it).

    ``max_input_shapes``: the largest shape of each graph input (an engine profile's max, batch
    included); without it the element limit is not checked. ``stand_ins``: ``domain.op`` names of
    operators the caller serves with another runtime (declared in the rules' ``stand_ins``).
    """
    import onnx

    rules = rules if rules is not None else load_rules()
    model = onnx.load(str(path), load_external_data=False)
    inferred = _infer(model, max_input_shapes)
    types: dict[str, int] = {t.name: t.data_type for t in model.graph.initializer}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    found = [
        *_opset(model, rules),
        *_tensor_types(model.graph, types, rules),
        *_operators(model.graph, types, stand_ins, rules),
    ]
    if max_input_shapes is not None:
        found += _element_limit(inferred, max_input_shapes, rules)
    return found


def _violation(rules: Mapping[str, Any], rule: str, where: str, message: str, source: str) -> Violation:
    return Violation(rule, where, message, rules["sources"].get(source, source))


def _io_names(graph: Any) -> set[str]:
    return {v.name for v in graph.input} | {v.name for v in graph.output}


def _opset(model: Any, rules: Mapping[str, Any]) -> list[Violation]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lowest, highest = rules["opset"]["min"], rules["opset"]["max"]
    if opset is not None and lowest <= opset <= highest:
        return []
    message = f"opset {opset}; TensorRT parses {lowest} to {highest}"
    return [_violation(rules, "opset", "model", message, rules["opset"]["source"])]


def _tensor_types(graph: Any, types: Mapping[str, int], rules: Mapping[str, Any]) -> list[Violation]:
    """Where each tensor's type may appear (UINT8 only at the network's edge)."""
    found = []
    io_names = _io_names(graph)
    for name, elem_type in types.items():
        if elem_type == 0:
            message = "its type could not be inferred, so it cannot be checked"
            found.append(_violation(rules, "tensor type", f"tensor {name}", message, "operators"))
            continue
        type_name = _type_name(elem_type)
        where_allowed = rules["tensor_types"].get(type_name, "nowhere")
        if where_allowed == "anywhere" or (where_allowed == "io_only" and name in io_names):
            continue
        place = "a network input or output" if name in io_names else "an intermediate tensor"
        what = "only as a network input or output" if where_allowed == "io_only" else "nowhere"
        message = f"is {type_name} ({place}); TensorRT takes {type_name} {what}"
        source = rules["tensor_type_sources"].get(type_name, "operators")
        found.append(_violation(rules, "tensor type", f"tensor {name}", message, source))
    return found


def _operators(
    graph: Any, types: Mapping[str, int], stand_ins: Collection[str], rules: Mapping[str, Any]
) -> list[Violation]:
    """Each node: its operator and input type in the support matrix, inputs that must be
    initializers, attribute values, outputs TensorRT does not produce."""
    import onnx

    found: list[Violation] = []
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    used = {name for node in graph.node for name in node.input} | _io_names(graph)
    for node in graph.node:
        where = _node_name(node)

        def violate(rule: str, message: str, source: str, where: str = where) -> None:
            found.append(_violation(rules, rule, where, message, source))

        if node.domain not in ("", "ai.onnx"):
            qualified = f"{node.domain}.{node.op_type}"
            if qualified not in stand_ins or qualified not in rules["stand_ins"]:
                violate("operator", f"{qualified} is not an ONNX operator TensorRT parses", "operators")
            continue
        supported = rules["operators"].get(node.op_type)
        if supported is None:
            violate("operator", f"{node.op_type} is not in TensorRT's support matrix", "operators")
            continue
        typed = node.input[0] if node.input and node.input[0] else (node.output[0] if node.output else "")
        if types.get(typed) and _type_name(types[typed]) not in supported:
            taken = ", ".join(supported)
            message = f"takes {_type_name(types[typed])} ({typed}); TensorRT's {node.op_type} takes {taken}"
            violate("operator type", message, "operators")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Cast" and _type_name(attributes["to"]) not in supported:
            message = f"casts to {_type_name(attributes['to'])}; TensorRT casts to {', '.join(supported)}"
            violate("operator type", message, "operators")
        for index in rules["constant_inputs"].get(node.op_type, ()):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                message = (
                    f"input {index} ({node.input[index]}) is computed; TensorRT needs an initializer there"
                )
                violate("constant input", message, "constant_inputs")
        allowed = rules["attributes"].get(node.op_type, {})
        for attribute, values in allowed.items():
            if attribute == "source" or attribute not in attributes:
                continue
            value = attributes[attribute]
            value = value.decode() if isinstance(value, bytes) else value
            if value not in values:
                violate("attribute", f"{attribute}={value!r}; TensorRT takes {values}", allowed["source"])
        if node.op_type in rules["first_output_only"]:
            extra = [o for o in node.output[1:] if o and o in used]
            if extra:
                message = f"outputs {extra} are used; TensorRT supports only the first output"
                violate("first output only", message, rules["first_output_only"][node.op_type])
    return found


def _infer(model: Any, max_input_shapes: Mapping[str, Sequence[int]] | None) -> Any:
    """A copy of the graph with every tensor's type and shape, by ONNX Runtime's symbolic shape
    inference (it knows the ``com.microsoft`` stand-ins too); at ``max_input_shapes`` when given.
    Weights kept in an external data file are not read (SDXL's text_encoder_2 holds 2.8 GB):
    inference sees them as inputs of their type and shape, and needs no weight's values."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = onnx.ModelProto()
    inference.CopyFrom(model)
    graph = inference.graph
    if max_input_shapes is not None:
        _fix_input_shapes(graph, max_input_shapes)
    for tensor in [t for t in graph.initializer if uses_external_data(t)]:
        graph.initializer.remove(tensor)
        graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    return SymbolicShapeInference.infer_shapes(
        inference, auto_merge=max_input_shapes is None, guess_output_rank=False
    )


def _fix_input_shapes(graph: Any, max_input_shapes: Mapping[str, Sequence[int]]) -> None:
    initializers = {t.name for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    missing = sorted({value.name for value in inputs} - set(max_input_shapes))
    if missing:
        raise ValueError(f"no largest shape for graph input(s) {missing}")
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        shape = list(max_input_shapes[value.name])
        if len(shape) != len(dims):
            raise ValueError(f"input {value.name}: shape {shape} for a graph input of rank {len(dims)}")
        for dim, size in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = int(size)


def _element_limit(
    inferred: Any, max_input_shapes: Mapping[str, Sequence[int]], rules: Mapping[str, Any]
) -> list[Violation]:
    limit = rules["element_limit"]["max_elements"]
    source = rules["element_limit"]["source"]
    found = []
    values = {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    for name, value in values.items():
        dims = value.type.tensor_type.shape.dim
        size = (
            math.prod(dim.dim_value for dim in dims)
            if all(dim.HasField("dim_value") for dim in dims)
            else None
        )
        if size is None:
            message = "its shape is unknown at the profile's largest input, so its size cannot be checked"
        elif size > limit:
            message = (
                f"has {size:,} elements at the profile's largest input {dict(max_input_shapes)}; "
                f"TensorRT takes at most {limit:,}"
            )
        else:
            continue
        found.append(_violation(rules, "element limit", f"tensor {name}", message, source))
    return found
