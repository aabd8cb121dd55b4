"""The operator's key: what a request must carry to use the APIs that change what the server runs.

Triton's model-repository API loads Python models whose code the request itself may carry
(``file:`` parameters), so whoever reaches it runs code in the server ("Secure Deployment
Considerations", Triton's docs). Every server the project starts (under :mod:`.supervisor`)
restricts these API groups to requests that carry the key, on HTTP and gRPC alike
(``--http-restricted-api``, ``--grpc-restricted-protocol``, tritonserver 2.51):

- ``model-repository``: index, load (with uploaded files), unload;
- ``shared-memory``: registering host or CUDA memory that the server then reads and writes;
- ``trace`` and ``logging``: settings that write files and change what is logged.

Inference, health, metadata, model-config and statistics stay open to every client.

Headers (measured on tritonserver 2.51): HTTP requests carry ``operator-key: <key>``; gRPC
requests carry the metadata ``triton-grpc-protocol-operator-key: <key>`` (Triton prefixes the key
name for gRPC). A refusal is HTTP 403 or gRPC UNAVAILABLE, "This API is restricted".

The key lives in a file: ``$DISTRIFUSION_OPERATOR_KEY_FILE``, else
``$XDG_CONFIG_HOME/distrifusion/operator-key`` (``~/.config/...``), outside any checkout, so it is
never committed, copied into an image or carried to another machine. ``scripts/setup.sh`` creates
it owner-only; in Kubernetes it is a Secret mounted as a file. A file that others may read is
refused, as ssh refuses such a private key.

    python -m distrifusion.serving.operator_key create   # a new key, unless a valid one is there
    python -m distrifusion.serving.operator_key path     # where the key is read from

Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import stat
import sys
from pathlib import Path

KEY_FILE_VARIABLE = "DISTRIFUSION_OPERATOR_KEY_FILE"
HEADER = "operator-key"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"
"""gRPC metadata name: tritonserver 2.51 expects the restricted key with this prefix."""
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
OPEN_APIS = ("health", "metadata", "inference", "model-config", "statistics")
_RESTRICTION_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")
_UNRESTRICTABLE_ENDPOINTS = ("--allow-sagemaker", "--allow-vertex-ai")
"""Endpoints with their own model-loading routes that the restriction flags do not cover."""

# Header-safe and free of the ',', ':' and '=' that separate the parts of Triton's flag value.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{32,256}")


class OperatorKeyError(RuntimeError):
    """The key file is missing, readable by others, or holds no usable key; the message says how."""


def key_path() -> Path:
    explicit = os.environ.get(KEY_FILE_VARIABLE)
    if explicit:
        return Path(explicit)
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "distrifusion" / "operator-key"


def _validated(text: str, path: Path) -> str:
    key = text.strip()
    if not _KEY_PATTERN.fullmatch(key):
        raise OperatorKeyError(
            f"{path}: the operator key must be 32 to 256 characters of A-Z, a-z, 0-9, '_' and '-' "
            f"(got {len(key)} characters{'' if key.isascii() else ', some not ASCII'}); make one with "
            "`openssl rand -hex 32` or `python -m distrifusion.serving.operator_key create`"
        )
    return key


def read_key(path: Path | None = None) -> str:
    """The key in ``path`` (default :func:`key_path`); refused when others may read the file."""
    path = key_path() if path is None else path
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise OperatorKeyError(
            f"no operator key at {path}: run scripts/setup.sh (CPU), mount the Kubernetes Secret "
            f"(docs/security.md), or point {KEY_FILE_VARIABLE} at the key file"
        ) from None
    if not stat.S_ISREG(mode):
        raise OperatorKeyError(f"{path}: the operator key must be a regular file")
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise OperatorKeyError(
            f"{path} is {stat.filemode(mode)}: others may read or change the operator key; "
            f"`chmod 600 {path}` (Kubernetes: the Secret volume's defaultMode 0400)"
        )
    return _validated(path.read_text(), path)


def create_key(path: Path | None = None) -> tuple[Path, bool]:
    """Writes a new random key to ``path`` (mode 0600, in a 0700 folder it creates) unless a valid
    one is there; (path, whether it was created). An invalid existing file is an error, not
    replaced: it may be the operator's."""
    path = key_path() if path is None else path
    if path.exists():
        read_key(path)
        return path, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as key_file:
        key_file.write(secrets.token_hex(32) + "\n")
    return path, True


def restricted_server_flags(command: list[str], key: str) -> list[str]:
    """tritonserver's ``command`` with the operator-key restriction on both protocols; refuses a
    command that sets its own restrictions or opens an endpoint the restriction does not cover."""
    for argument in command:
        name, _, value = argument.partition("=")
        if name in _RESTRICTION_FLAGS:
            raise OperatorKeyError(
                f"{name} is set by the supervisor from the operator key; remove it from the command"
            )
        if name in _UNRESTRICTABLE_ENDPOINTS and value.lower() not in ("false", "0", "no", "off"):
            raise OperatorKeyError(
                f"{argument}: that endpoint loads models without the operator key's restriction; "
                "serve through HTTP and gRPC only"
            )
    apis = ",".join(RESTRICTED_APIS)
    return [*command, f"--http-restricted-api={apis}:{HEADER}={key}",
            f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distrifusion.serving.operator_key", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=("create", "path"))
    args = parser.parse_args(argv)
    try:
        if args.command == "path":
            print(key_path())
            return 0
        path, created = create_key()
    except OperatorKeyError as error:
        print(f"operator_key: {error}", file=sys.stderr)
        return 1
    print(f"operator key {'created at' if created else 'present at'} {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
