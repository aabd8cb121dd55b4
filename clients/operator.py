"""The operator's model control, with the operator's key: list, load and unload models.

    python -m clients.operator index
    python -m clients.operator unload sdxl
    python -m clients.operator load sdxl --protocol grpc --url localhost:8001

The key is read from the key file (``$DISTRIFUSION_OPERATOR_KEY_FILE``, else
``~/.config/distrifusion/operator-key``; see ``distrifusion.serving.operator_key``) and sent as the
header the server expects on each protocol. Without it the server answers HTTP 403 or gRPC
UNAVAILABLE, "This API is restricted".

An unload of a served model keeps the server not ready until the model is loaded again
(the supervisor's readiness); that is the way to take a replica out of rotation by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from distrifusion.serving.operator_key import GRPC_HEADER, HEADER, OperatorKeyError, read_key

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}


def operator_client(protocol: str, url: str) -> tuple[Any, dict[str, str]]:
    """A tritonclient for ``protocol`` and the headers that carry the operator's key on it."""
    key = read_key()
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(url), {GRPC_HEADER: key}
    return httpclient.InferenceServerClient(url), {HEADER: key}


def model_index(client: Any, headers: dict[str, str]) -> list[dict[str, str]]:
    """Name, version, state and reason of every model in the repository."""
    if isinstance(client, grpcclient.InferenceServerClient):
        index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
    else:
        index = client.get_model_repository_index(headers=headers)
    return [
        {field: entry.get(field, "") for field in ("name", "version", "state", "reason")} for entry in index
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("index", "load", "unload"))
    parser.add_argument("model", nargs="?", help="the model to load or unload")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", help="host:port (default: localhost:8000 for http, localhost:8001 for grpc)")
    args = parser.parse_args(argv)
    if (args.action == "index") != (args.model is None):
        parser.error("index takes no model; load and unload take one")
    try:
        client, headers = operator_client(args.protocol, args.url or DEFAULT_URLS[args.protocol])
        if args.action == "index":
            for entry in model_index(client, headers):
                print(" ".join(value for value in entry.values() if value))
        elif args.action == "load":
            client.load_model(args.model, headers=headers)
        else:
            client.unload_model(args.model, headers=headers)
    except (OperatorKeyError, InferenceServerException) as error:
        print(f"operator: {error}", file=sys.stderr)
        return 1
    if args.model:
        print(f"{args.action}ed {args.model}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
