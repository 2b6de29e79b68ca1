"""The W3C trace context of the code that publishes a job.

Uses only `opentelemetry-api`: with no SDK configured there is no active span, nothing is
injected, and a job travels without `traceparent`. The globally configured propagator is
used, so an application that set B3 or another format still gets W3C headers only when its
propagator writes them.
"""

from __future__ import annotations

from opentelemetry import propagate

__all__ = ["TraceHeaders", "current_trace_headers"]

TraceHeaders = tuple[str | None, str | None]
"""(traceparent, tracestate)."""


def current_trace_headers() -> TraceHeaders:
    """The current context's `traceparent` and `tracestate`, or None for each absent one."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate") or None
