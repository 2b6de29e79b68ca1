"""W3C trace context of jobs, and the OpenTelemetry messaging names jobstream's spans use.

Uses only `opentelemetry-api`: with no SDK configured there is no recording span, the
current context (if any) passes through unchanged, and a job published outside any span
travels without `traceparent`. The globally configured propagator is used, so an
application that set B3 or another format still gets W3C headers only when its propagator
writes them.

The attribute names follow the OpenTelemetry messaging semantic conventions (the current
names: `messaging.destination.partition.id`, `messaging.kafka.offset`,
`messaging.operation.type` = `send` / `process`); docs/observability.md lists them.
"""

from __future__ import annotations

import re

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanContext, TraceFlags, TracerProvider, TraceState

__all__ = [
    "TraceHeaders",
    "current_trace_headers",
    "recording_provider",
    "span_context_of",
    "traceparent_of",
]

TraceHeaders = tuple[str | None, str | None]
"""(traceparent, tracestate)."""

# Messaging semantic conventions (attribute names and values).
SYSTEM = "messaging.system"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
DESTINATION = "messaging.destination.name"
PARTITION = "messaging.destination.partition.id"
KAFKA_OFFSET = "messaging.kafka.offset"
KAFKA_KEY = "messaging.kafka.message.key"
MESSAGE_ID = "messaging.message.id"
CONSUMER_GROUP = "messaging.consumer.group.name"
BATCH_COUNT = "messaging.batch.message_count"
# jobstream's own attributes.
JOB_ID = "jobstream.job.id"
JOB_TYPE = "jobstream.job.type"
JOB_VERSION = "jobstream.job.version"
JOB_ATTEMPT = "jobstream.job.attempt"
LINK_TYPE = "jobstream.link.type"
"""On every span link jobstream adds: `origin`, `previous-attempt`, `producer`,
`dead-letter`."""

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def current_trace_headers() -> TraceHeaders:
    """The current context's `traceparent` and `tracestate`, or None for each absent one."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate") or None


def traceparent_of(context: SpanContext) -> TraceHeaders:
    """`context` as W3C (traceparent, tracestate); (None, None) for an invalid context."""
    if not context.is_valid:
        return None, None
    parent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    state = context.trace_state.to_header() if context.trace_state else ""
    return parent, state or None


def span_context_of(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """The remote span context a W3C `traceparent` names, or None if absent or malformed
    (a bad header must never fail a job: it only loses a link)."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None or match.group(1) == "ff" or (match.group(1) == "00" and match.group(5)):
        return None
    trace_id, span_id = int(match.group(2), 16), int(match.group(3), 16)
    if not trace_id or not span_id:
        return None
    state = TraceState.from_header([tracestate]) if tracestate else TraceState()
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(int(match.group(4), 16)),
        trace_state=state,
    )


def recording_provider(provider: TracerProvider) -> bool:
    """False for the API's no-op providers (no SDK configured): nothing would record.
    The global proxy counts as the provider set since, if any."""
    if isinstance(provider, trace.ProxyTracerProvider):
        provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
