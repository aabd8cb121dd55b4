"""Protocol-buffer text format for Triton ``config.pbtxt`` files: parse, edit, write, validate.

Written here because the project has no Triton client or server package: :func:`parse` reads
the text format (comments, ``name: value``, ``name { ... }``, ``name: [ ... ]`` lists, strings
with C escapes, enum identifiers), :func:`dumps` writes it back in Triton's usual layout, and
:func:`validate_model_config` checks field names, value kinds and enum values against the
subset of Triton's ``ModelConfig`` schema that this project's configs may use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any


class PbtxtError(ValueError):
    pass


class Ident(str):
    """An unquoted identifier value: an enum name (``TYPE_FP32``, ``KIND_GPU``) or ``true``/``false``."""

    __slots__ = ()


class Message:
    """An ordered list of ``(field, value)`` pairs; a repeated field appears once per element."""

    def __init__(self, fields: list[tuple[str, Any]] | None = None):
        self.fields: list[tuple[str, Any]] = []
        for name, value in fields or []:
            self.add(name, value)

    def __repr__(self) -> str:
        return f"Message({self.fields!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and self.fields == other.fields

    def get_all(self, name: str) -> list[Any]:
        """Every element of ``name`` (an explicitly empty list gives ``[]``)."""
        out: list[Any] = []
        for k, v in self.fields:
            if k == name:
                out.extend(v if isinstance(v, list) else [v])
        return out

    def get(self, name: str, default: Any = None) -> Any:
        values = self.get_all(name)
        if len(values) > 1:
            raise PbtxtError(f"field {name!r} is repeated")
        return values[0] if values else default

    def has(self, name: str) -> bool:
        return any(k == name for k, _ in self.fields)

    def remove(self, name: str) -> None:
        self.fields = [(k, v) for k, v in self.fields if k != name]

    def add(self, name: str, value: Any) -> None:
        """Append a value; a non-empty list appends one entry per element."""
        if isinstance(value, list) and value:
            self.fields.extend((name, v) for v in value)
        else:
            self.fields.append((name, value))

    def set(self, name: str, value: Any) -> None:
        """Replace every occurrence of ``name`` by one value (a list: one entry per element),
        at the position of the first occurrence (or at the end)."""
        values = value if isinstance(value, list) and value else [value]
        index = next((i for i, (k, _) in enumerate(self.fields) if k == name), len(self.fields))
        kept = [(k, v) for k, v in self.fields if k != name]
        before = sum(1 for k, _ in self.fields[:index] if k != name)
        self.fields = kept[:before] + [(name, v) for v in values] + kept[before:]


# --- parsing -------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?)(?![A-Za-z_]))
  | (?P<ident>-?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}\[\]<>:,;])
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11, "\\": 92, "'": 39, '"': 34, "?": 63}


def _unescape(body: str, line: int) -> str:
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise PbtxtError(f"line {line}: dangling backslash in string")
        esc = body[i]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 1
        elif esc in "xX":
            m = re.match(r"[0-9a-fA-F]{1,2}", body[i + 1 :])
            if not m:
                raise PbtxtError(f"line {line}: bad \\x escape")
            out.append(int(m.group(), 16))
            i += 1 + len(m.group())
        elif esc in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i:])
            assert m
            out.append(int(m.group(), 8) & 0xFF)
            i += len(m.group())
        else:
            raise PbtxtError(f"line {line}: unknown escape \\{esc}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PbtxtError(f"line {line}: string is not UTF-8") from err


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise PbtxtError(f"line {line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        value = m.group()
        if kind != "ws":
            yield kind, value, line  # type: ignore[misc]
        line += value.count("\n")
        pos = m.end()


class _Parser:
    def __init__(self, text: str):
        self.tokens = list(_tokens(text))
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise PbtxtError("unexpected end of input")
        self.i += 1
        return tok

    def message(self, closer: str | None) -> Message:
        msg = Message()
        while True:
            tok = self.peek()
            if tok is None:
                if closer is not None:
                    raise PbtxtError(f"unexpected end of input: missing {closer!r}")
                return msg
            kind, value, line = tok
            if closer is not None and value == closer:
                self.i += 1
                return msg
            if kind != "ident" or value.startswith("-"):
                raise PbtxtError(f"line {line}: expected a field name, got {value!r}")
            self.i += 1
            self.field(msg, value)
            sep = self.peek()
            if sep is not None and sep[1] in (",", ";"):
                self.i += 1

    def field(self, msg: Message, name: str) -> None:
        kind, value, line = self.next()
        colon = value == ":"
        if colon:
            kind, value, line = self.next()
        if value in ("{", "<"):
            msg.add(name, self.message("}" if value == "{" else ">"))
        elif value == "[":
            # A list: scalars (``dims: [1, 2]``) or messages (``input [ {...}, {...} ]``).
            if self.peek() is not None and self.peek()[1] == "]":  # type: ignore[index]
                self.i += 1
                msg.add(name, [])  # an explicitly empty repeated field
                return
            while True:
                kind, value, line = self.next()
                if value in ("{", "<"):
                    msg.add(name, self.message("}" if value == "{" else ">"))
                else:
                    if not colon:
                        raise PbtxtError(f"line {line}: a list of scalars needs ':' after {name!r}")
                    msg.add(name, self.scalar(kind, value, line))
                kind, value, line = self.next()
                if value == "]":
                    return
                if value != ",":
                    raise PbtxtError(f"line {line}: expected ',' or ']' in the list of {name!r}")
        else:
            if not colon:
                raise PbtxtError(f"line {line}: expected ':' after {name!r}")
            msg.add(name, self.scalar(kind, value, line))

    def scalar(self, kind: str, value: str, line: int) -> Any:
        if kind == "string":
            parts = [_unescape(value[1:-1], line)]
            while self.peek() is not None and self.peek()[0] == "string":  # type: ignore[index]
                _, more, more_line = self.next()
                parts.append(_unescape(more[1:-1], more_line))
            return "".join(parts)
        if kind == "number":
            text = value.rstrip("fF") if not value.lower().startswith(("0x", "-0x", "+0x")) else value
            if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+|\d+)", text):
                return int(text, 0) if "x" in text.lower() else int(text)
            return float(text)
        if kind == "ident":
            return Ident(value)
        raise PbtxtError(f"line {line}: expected a value, got {value!r}")


def parse(text: str) -> Message:
    """Parse protobuf text format into a :class:`Message`."""
    return _Parser(text).message(None)


# --- writing -------------------------------------------------------------------------------------

# Fields written in list syntax even with one element (Triton's own configs do).
_LIST_FIELDS = {"input", "output", "instance_group", "step", "dims"}
# Map entries: each written as its own block.
_MAP_FIELDS = {"parameters", "input_map", "output_map"}


def _scalar(value: Any) -> str:
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    raise PbtxtError(f"cannot write {type(value).__name__} value {value!r}")


def _write(msg: Message, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    groups: list[tuple[str, list[Any]]] = []
    for name, value in msg.fields:
        values = value if isinstance(value, list) else [value]
        if groups and groups[-1][0] == name and name not in _MAP_FIELDS:
            groups[-1][1].extend(values)
        else:
            groups.append((name, list(values)))
    for name, values in groups:
        as_list = name not in _MAP_FIELDS and (name in _LIST_FIELDS or len(values) != 1)
        if not values:
            out.append(f"{pad}{name}: []")
        elif all(isinstance(v, Message) for v in values):
            if as_list:
                out.append(f"{pad}{name} [")
                for j, v in enumerate(values):
                    out.append(f"{pad}  {{")
                    _write(v, indent + 2, out)
                    out.append(f"{pad}  }}" + ("," if j < len(values) - 1 else ""))
                out.append(f"{pad}]")
            else:
                for v in values:
                    out.append(f"{pad}{name} {{")
                    _write(v, indent + 1, out)
                    out.append(f"{pad}}}")
        elif any(isinstance(v, Message) for v in values):
            raise PbtxtError(f"field {name!r} mixes messages and scalars")
        elif as_list:
            out.append(f"{pad}{name}: [ " + ", ".join(_scalar(v) for v in values) + " ]")
        else:
            out.append(f"{pad}{name}: {_scalar(values[0])}")


def dumps(msg: Message, header: str = "") -> str:
    """Write ``msg`` in text format, after ``header`` (comment lines, without the ``#``)."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    _write(msg, 0, out)
    return "\n".join(out) + "\n"


# --- Triton ModelConfig schema (the subset this project uses, checked strictly) ------------------

DATA_TYPES = {
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_UINT16",
    "TYPE_UINT32",
    "TYPE_UINT64",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
    "TYPE_BF16",
}
_KINDS = {"KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"}
_BOOL = {"true", "false"}

# field -> (kind, repeated); kind is "string", "int", "float", "bool", a set of enum names, or a
# message type name.
_SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "ModelConfig": {
        "name": ("string", False),
        "platform": ("string", False),
        "backend": ("string", False),
        "runtime": ("string", False),
        "max_batch_size": ("int", False),
        "input": ("ModelInput", True),
        "output": ("ModelOutput", True),
        "instance_group": ("ModelInstanceGroup", True),
        "default_model_filename": ("string", False),
        "dynamic_batching": ("ModelDynamicBatching", False),
        "ensemble_scheduling": ("ModelEnsembleScheduling", False),
        "parameters": ("ParameterEntry", True),
        "model_transaction_policy": ("ModelTransactionPolicy", False),
        "version_policy": ("ModelVersionPolicy", False),
        "response_cache": ("ModelResponseCache", False),
    },
    "ModelInput": {
        "name": ("string", False),
        "data_type": (DATA_TYPES, False),
        "format": ({"FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"}, False),
        "dims": ("int", True),
        "reshape": ("ModelTensorReshape", False),
        "is_shape_tensor": ("bool", False),
        "allow_ragged_batch": ("bool", False),
        "optional": ("bool", False),
    },
    "ModelOutput": {
        "name": ("string", False),
        "data_type": (DATA_TYPES, False),
        "dims": ("int", True),
        "reshape": ("ModelTensorReshape", False),
        "label_filename": ("string", False),
        "is_shape_tensor": ("bool", False),
    },
    "ModelTensorReshape": {"shape": ("int", True)},
    "ModelInstanceGroup": {
        "name": ("string", False),
        "kind": (_KINDS, False),
        "count": ("int", False),
        "gpus": ("int", True),
        "profile": ("string", True),
        "passive": ("bool", False),
        "host_policy": ("string", False),
    },
    "ModelDynamicBatching": {
        "preferred_batch_size": ("int", True),
        "max_queue_delay_microseconds": ("int", False),
        "preserve_ordering": ("bool", False),
        "priority_levels": ("int", False),
        "default_priority_level": ("int", False),
    },
    "ModelEnsembleScheduling": {"step": ("EnsembleStep", True)},
    "EnsembleStep": {
        "model_name": ("string", False),
        "model_version": ("int", False),
        "input_map": ("StringMapEntry", True),
        "output_map": ("StringMapEntry", True),
        "model_namespace": ("string", False),
    },
    "StringMapEntry": {"key": ("string", False), "value": ("string", False)},
    "ParameterEntry": {"key": ("string", False), "value": ("ModelParameter", False)},
    "ModelParameter": {"string_value": ("string", False)},
    "ModelTransactionPolicy": {"decoupled": ("bool", False)},
    "ModelVersionPolicy": {
        "latest": ("LatestPolicy", False),
        "all": ("AllPolicy", False),
        "specific": ("SpecificPolicy", False),
    },
    "LatestPolicy": {"num_versions": ("int", False)},
    "AllPolicy": {},
    "SpecificPolicy": {"versions": ("int", True)},
    "ModelResponseCache": {"enable": ("bool", False)},
}


def _check(msg: Message, type_name: str, path: str, errors: list[str]) -> None:
    schema = _SCHEMA[type_name]
    counts: dict[str, int] = {}
    for name, value in msg.fields:
        where = f"{path}.{name}" if path else name
        if name not in schema:
            errors.append(f"{where}: unknown field of {type_name}")
            continue
        kind, _ = schema[name]
        counts[name] = counts.get(name, 0) + (len(value) if isinstance(value, list) else 1)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(kind, set):
                if not isinstance(item, Ident) or item not in kind:
                    errors.append(f"{where}: {item!r} is not one of {sorted(kind)}")
            elif kind == "string":
                if not isinstance(item, str) or isinstance(item, Ident):
                    errors.append(f"{where}: expected a quoted string, got {item!r}")
            elif kind == "int":
                if not isinstance(item, int) or isinstance(item, bool):
                    errors.append(f"{where}: expected an integer, got {item!r}")
            elif kind == "float":
                if not isinstance(item, (int, float)):
                    errors.append(f"{where}: expected a number, got {item!r}")
            elif kind == "bool":
                if not (isinstance(item, Ident) and item in _BOOL) and item not in (0, 1):
                    errors.append(f"{where}: expected true or false, got {item!r}")
            elif not isinstance(item, Message):
                errors.append(f"{where}: expected a {{ ... }} message, got {item!r}")
            else:
                _check(item, kind, where, errors)
    for name, count in counts.items():
        if count > 1 and not schema[name][1]:
            errors.append(f"{path + '.' if path else ''}{name}: not a repeated field, given {count} times")


def validate_model_config(msg: Message) -> list[str]:
    """Schema errors of a Triton ``ModelConfig`` (empty when valid), plus basic semantic checks."""
    errors: list[str] = []
    _check(msg, "ModelConfig", "", errors)
    if not msg.get("name"):
        errors.append("name: missing")
    if not (msg.get("platform") or msg.get("backend")):
        errors.append("neither platform nor backend is set")
    for kind in ("input", "output"):
        names = [t.get("name") for t in msg.get_all(kind) if isinstance(t, Message)]
        for t in msg.get_all(kind):
            if isinstance(t, Message) and (t.get("data_type") is None or not t.has("dims")):
                errors.append(f"{kind} {t.get('name')!r}: data_type and dims are required")
        if len(set(names)) != len(names):
            errors.append(f"{kind}: duplicate tensor names {names}")
    for key, entries in (("parameters", msg.get_all("parameters")),):
        keys = [e.get("key") for e in entries if isinstance(e, Message)]
        if len(set(keys)) != len(keys):
            errors.append(f"{key}: duplicate keys {keys}")
    return errors


def parameters(msg: Message) -> dict[str, str]:
    """The ``parameters`` map of a config as ``{key: string_value}``."""
    out = {}
    for entry in msg.get_all("parameters"):
        value = entry.get("value")
        out[entry.get("key")] = value.get("string_value", "") if isinstance(value, Message) else ""
    return out


def set_parameters(msg: Message, values: dict[str, str]) -> None:
    """Set (replace or add) ``parameters`` entries, keeping other keys and their order."""
    entries = msg.get_all("parameters")
    done = set()
    new_entries = []
    for entry in entries:
        key = entry.get("key")
        if key in values:
            entry = Message([("key", key), ("value", Message([("string_value", values[key])]))])
            done.add(key)
        new_entries.append(entry)
    for key, value in values.items():
        if key not in done:
            new_entries.append(Message([("key", key), ("value", Message([("string_value", value)]))]))
    msg.set("parameters", new_entries)


def tensor(name: str, data_type: str, dims: list[int] | tuple[int, ...], optional: bool = False) -> Message:
    """A ``ModelInput``/``ModelOutput`` message."""
    fields: list[tuple[str, Any]] = [("name", name), ("data_type", Ident(data_type)), ("dims", list(dims))]
    if optional:
        fields.append(("optional", Ident("true")))
    return Message(fields)
