"""Structured logs: one JSON object per line, with the job's fields merged in, written
through a buffer that is flushed often and always before the process ends.

Steps and handlers pass job fields as `extra={"job": {...}}`; the formatter lifts them to
the top level of the JSON object so log pipelines can index job_id, attempt, outcome.
A line written inside a span (a job's processing span, with tracing on) also gets
`trace_id` and `span_id` (32 and 16 hex digits, as Jaeger and the W3C `traceparent` show
them), so a log line leads to its trace and back.

`JsonFormatter` encodes with orjson: a job line costs a few microseconds, not tens.

`LineHandler` guarantees (docs/observability.md#logs):

- a line is whole: lines are joined in a buffer and written in one `write` per flush;
- only the per-job loggers' lines below WARNING (`BUFFERED_LOGGERS`: the job line, a
  handler's `ctx.logger`) wait, at most `FLUSH_INTERVAL_S` (0.1 s), or until the buffer
  holds `MAX_BUFFERED` characters; any other line is written at once, together with the
  lines buffered before it, so the order of lines is kept (and a lifecycle line still
  comes before what the CLI prints to stderr after it);
- nothing is lost at a normal exit (`logging.shutdown`, which Python runs at exit, flushes
  it), at SIGTERM or SIGINT (the worker drains and exits normally; a process that
  leaves SIGTERM at its default gets a handler from `configure_logging` that flushes and
  then dies of the signal as before), or at the worker's forced exit (its ERROR line
  flushes everything before it). A SIGKILL loses at most the last 0.1 s of lines;
- a forked child (a `cpu_bound` pool process) does not inherit the parent's unwritten
  lines, and writes each of its own lines at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime
from types import FrameType
from typing import TextIO

import orjson
from opentelemetry import trace

from consumer.core import LoggingSettings

FLUSH_INTERVAL_S = 0.1
"""Longest time a line waits in the buffer."""
MAX_BUFFERED = 64 * 1024
"""Characters buffered before a write, whatever the interval."""
BUFFERED_LOGGERS = ("jobstream.job", "jobstream.handler")
"""The loggers that write per job, whose lines below WARNING wait in the buffer; any other
line is written at once, with the lines buffered before it."""
THIRD_PARTY_LOGGERS = ("aiokafka", "nats")
"""Broker clients whose lines (WARNING and worse) go through the same handler and format."""

_get_current_span = trace.get_current_span


def trace_fields() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, if there is one (else nothing)."""
    context = _get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class _Timestamps:
    """`2026-11-22T18:20:31.512+00:00` (UTC, milliseconds), the date and time part kept
    per second: `datetime.isoformat` costs more than the rest of a job line."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached = (-1, "")  # one attribute: threads may format at the same time

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached_second, prefix = self.cached
        if second != cached_second:
            stamp = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
            prefix = stamp[:-6]  # without "+00:00"
            self.cached = (second, prefix)
        return f"{prefix}.{int(record.msecs):03d}+00:00"


class JsonFormatter(logging.Formatter):
    """One JSON object: `time`, `level`, `logger`, `message`, the job's fields, then
    `trace_id`/`span_id` inside a span and `exception` with a traceback.

    Encoded by orjson (compact, UTF-8), about 10 times faster than `json.dumps` for a job
    line; a value orjson refuses (an integer beyond 64 bits, a key that is not a string)
    takes `json.dumps`. Other values are written as `str(value)`, as before."""

    def __init__(self) -> None:
        super().__init__()
        self._timestamps = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._timestamps.format(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            entry.update(job)
        context = _get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except orjson.JSONEncodeError:
            return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job", None)
        fields = {**job, **trace_fields()} if isinstance(job, dict) else trace_fields()
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class LineHandler(logging.Handler):
    """Writes formatted lines to a text stream through a buffer: see the module docstring.

    `flush_interval_s = 0` writes every line at once (what a forked child does)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        max_buffered: int = MAX_BUFFERED,
        flush_level: int = logging.WARNING,
        buffered: Iterable[str] = BUFFERED_LOGGERS,
    ) -> None:
        super().__init__()
        self.stream = sys.stderr if stream is None else stream
        self.flush_interval_s = flush_interval_s
        self._max_buffered = max_buffered
        self._flush_level = flush_level
        self._buffered = frozenset(buffered)
        self._lines: list[str] = []
        self._size = 0
        self._due = threading.Event()  # set by the first line after a flush
        self._closed = False
        self._timer: threading.Thread | None = None
        _LIVE.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        # Called with `self.lock` held (`Handler.handle`), as `flush` takes it.
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line)
        if (
            record.levelno >= self._flush_level
            or record.name not in self._buffered
            or self._size >= self._max_buffered
            or self.flush_interval_s <= 0
            or self._closed
        ):
            self.flush()
        elif len(self._lines) == 1:
            self._wake_timer()

    def _wake_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(
                target=self._flush_periodically, name="jobstream-log-flush", daemon=True
            )
            self._timer.start()
        self._due.set()

    def _flush_periodically(self) -> None:
        while not self._closed:
            self._due.wait()
            self._due.clear()
            time.sleep(self.flush_interval_s)
            self.flush()

    def flush(self) -> None:
        """Write what is buffered, in one write, and flush the stream."""
        with self.lock or contextlib.nullcontext():
            lines, self._lines, self._size = self._lines, [], 0
            with contextlib.suppress(ValueError, AttributeError):  # a stream closed under us
                if lines:
                    self.stream.write("".join(lines))
                self.stream.flush()

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._due.set()
        _LIVE.discard(self)
        super().close()

    def _after_fork_in_child(self) -> None:
        # The parent writes the lines it buffered; the child has no timer thread, and a
        # pool process ends with os._exit (no atexit): it writes each line at once.
        # (`logging` itself renews `self.lock` in the child.)
        self._due = threading.Event()
        self._lines, self._size, self._timer = [], 0, None
        self.flush_interval_s = 0

    def __repr__(self) -> str:
        return f"<LineHandler {getattr(self.stream, 'name', self.stream)!r}>"


_LIVE: weakref.WeakSet[LineHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_LIVE):
        handler._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush_logs() -> None:
    """Write every line buffered by a `LineHandler` of this process."""
    for handler in list(_LIVE):
        handler.flush()


def _flush_then_die(signum: int, frame: FrameType | None) -> None:
    # Only while SIGTERM is at its default (nobody else handles it): flush, then end as
    # the default action would (killed by the signal, same exit status for the parent).
    flush_logs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def configure_logging(settings: LoggingSettings) -> None:
    """Send the `jobstream` loggers, and the broker clients' (`aiokafka`, `nats`, WARNING
    and worse), to stderr in the configured format, through one `LineHandler`."""
    handler = LineHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("jobstream")
    for old in root.handlers:
        if isinstance(old, LineHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    root.propagate = False
    for name in THIRD_PARTY_LOGGERS:
        client = logging.getLogger(name)
        client.handlers[:] = [handler]
        client.setLevel(logging.WARNING)
        client.propagate = False
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _flush_then_die)
