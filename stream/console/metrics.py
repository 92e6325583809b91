"""Prometheus metrics of the console (``GET /metrics``): what it saw on the topics and what operators did.

``linewatch_console_drift_alerts_total`` counts the drift alerts read from the drift topic (the worker
publishes them but exports no metric of its own for them; k8s/monitoring's rule and dashboard use this one).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

TOPIC_KINDS = ("result", "defect", "drift", "dlq", "serving", "model_event", "feedback")


class ConsoleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.records = Counter("linewatch_console_records_total", "Records the console applied, by kind", ["kind"],
                               registry=r)
        for k in TOPIC_KINDS:
            self.records.labels(kind=k)
        self.drift_alerts = Counter("linewatch_console_drift_alerts_total", "Drift alerts read from the drift topic",
                                    ["detector"], registry=r)
        self.feedback = Counter("linewatch_console_feedback_total", "Operator verdicts on defect events",
                                ["verdict"], registry=r)
        for v in ("confirmed", "false_alarm"):
            self.feedback.labels(verdict=v)
        self.sse_dropped = Counter("linewatch_console_sse_dropped", "Live-update events dropped for a client "
                                   "that fell behind (oldest first)", registry=r)
        self.sse_clients = Gauge("linewatch_console_sse_clients", "Connected live-update (SSE) clients", registry=r)

    def observe(self, kind: str, payload: dict[str, Any]) -> None:
        """Called with every state change (before it is sent to the SSE clients)."""
        if kind not in TOPIC_KINDS:
            return
        self.records.labels(kind=kind).inc()
        if kind == "drift":
            self.drift_alerts.labels(detector=str(payload.get("detector") or "unknown")[:64]).inc()
        elif kind == "feedback" and payload.get("verdict") in ("confirmed", "false_alarm"):
            self.feedback.labels(verdict=payload["verdict"]).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
