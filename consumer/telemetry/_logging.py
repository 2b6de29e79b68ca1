"""Structured logs: one JSON object per line, with the job's fields merged in.

Steps and handlers pass job fields as `extra={"job": {...}}`; the formatter lifts them to
the top level of the JSON object so log pipelines can index job_id, attempt, outcome.
A line written inside a span (a job's processing span, with tracing on) also gets
`trace_id` and `span_id` (32 and 16 hex digits, as Jaeger and the W3C `traceparent` show
them), so a log line leads to its trace and back.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from consumer.core import LoggingSettings


def trace_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, if there is one (else nothing)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            entry.update(job)
        entry.update(trace_fields())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job", None)
        fields = {**job, **trace_fields()} if isinstance(job, dict) else trace_fields()
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(settings: LoggingSettings) -> None:
    """Send the `jobstream` loggers to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("jobstream")
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    root.propagate = False
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
