"""Traces, metrics and logs: the tracing and metrics steps, hand-off and replay spans, the
OTEL_* configuration and the JSON log format. No broker client is imported here."""

from consumer.telemetry._logging import (
    JsonFormatter,
    LineHandler,
    TextFormatter,
    configure_logging,
    flush_logs,
)
from consumer.telemetry._metrics import Backlog, ReportsBacklog, WorkerMetrics
from consumer.telemetry._telemetry import Telemetry, configure
from consumer.telemetry._tracing import (
    HandOff,
    TraceLinks,
    TracingStep,
    handing_off,
    replaying,
    retrace,
)

__all__ = [
    "Backlog",
    "HandOff",
    "JsonFormatter",
    "LineHandler",
    "ReportsBacklog",
    "Telemetry",
    "TextFormatter",
    "TraceLinks",
    "TracingStep",
    "WorkerMetrics",
    "configure",
    "configure_logging",
    "flush_logs",
    "handing_off",
    "replaying",
    "retrace",
]
