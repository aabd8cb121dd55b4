"""Triton glue for the readiness gate: its load lasts while the supervisor holds the gate closed."""

from triton_glue import error_response, log

from distrifusion.serving.health import wait_for_gate


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        log("warn", "readiness gate closed: the server reports not ready until every part serves again")
        wait_for_gate()
        log("info", "readiness gate opened")

    def execute(self, requests: list) -> list:
        return [error_response("readiness_gate serves no requests", "invalid_argument") for _ in requests]
