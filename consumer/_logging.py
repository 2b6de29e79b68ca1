"""Structured logs: one JSON object per line, with the job's fields merged in.

Steps and handlers pass job fields as `extra={"job": {...}}`; the formatter lifts them to
the top level of the JSON object so log pipelines can index job_id, attempt, outcome.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from consumer._settings import LoggingSettings


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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in job.items())
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
