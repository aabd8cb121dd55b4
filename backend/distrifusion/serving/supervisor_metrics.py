"""The supervisor's Prometheus metrics: which served models are ready, and its reloads.

They are the supervisor's, not a model's: Triton's metrics port (8002) carries a model's metrics
only while that model is loaded, and these must speak for models that are not. Served on the
supervisor's own port (8003 by default) next to Triton's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class SupervisorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_ready = Gauge(
            "distrifusion_model_ready",
            "1 while a model that this server serves (loaded at start) is READY in Triton, else 0",
            ["model"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "distrifusion_ready",
            "1 while every served model is READY and nothing recovers (the supervisor's readiness), else 0",
            registry=self.registry,
        )
        self.reloads = Counter(
            "distrifusion_model_reloads_total",
            "Loads of a served model by the supervisor (a dead stub, or a model lost in a recovery), by result",
            ["model", "result"],
            registry=self.registry,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def observe(self, served: Iterable[str], states: Mapping[str, str], ready: bool) -> None:
        for model in served:
            self.model_ready.labels(model=model).set(1 if states.get(model) == "READY" else 0)
        self.ready.set(1 if ready else 0)

    def reloaded(self, model: str, ok: bool) -> None:
        self.reloads.labels(model=model, result="ok" if ok else "failed").inc()
