"""Step (outermost): one CONSUMER span per processing attempt, and the routing spans.

A processing span is named `process <topic>` (OpenTelemetry messaging conventions) and
carries the `messaging.*` and `jobstream.job.*` attributes. Its parent is the span that
published the record (`telemetry.attempt_parent = "producer"`, the default, so the request,
the job and every retry form one trace) or nothing (`"none"`: a new trace per attempt,
linked to the publishing span). It always links to the job's **origin** (`joborigin`, the
context that created the job) and, on a retry or a replay, to the **previous attempt**
(`jobprevattempt`, written by the router). Every other step and the handler run inside it,
so the job's log line carries its ids and the spans a handler creates nest under it. A
failed attempt gets status ERROR and the exception as an event.

Routers call `handing_off` around republishing a failed job: a PRODUCER span `send <tier
or dead-letter topic>`, child of the attempt, linked to the origin, whose context becomes
the new record's `traceparent`; the attempt's own context becomes its `jobprevattempt`. The
origin is never rewritten: it survives every tier, the dead-letter topic and a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer

from consumer.core import JobRun, Next, Outcome, error_text
from producer import tracecontext as otel
from producer.tracecontext import span_context_of, traceparent_of
from schemas import JobAttributes
from schemas.names import PREVIOUS_ATTEMPT

"""Extension attribute (`ce_jobprevattempt`): traceparent of the attempt that failed last."""
OUTCOME = "jobstream.job.outcome"
REASON = "jobstream.failure.reason"
REPLAY_OF = "jobstream.replay.of"
_FAILED = (Outcome.FAILED, Outcome.RETRYING, Outcome.DEAD_LETTERED)
# Span attributes of a replay, and the dead letter's header each one is read from.
_REPLAYED_HEADERS = ((otel.MESSAGE_ID, "ce_id"), (otel.JOB_ID, "ce_id"), (otel.JOB_TYPE, "ce_type"))


@dataclass(frozen=True, slots=True)
class TraceLinks:
    """The span contexts a job's headers name."""

    origin: SpanContext | None
    producer: SpanContext | None
    previous: SpanContext | None

    @classmethod
    def of(
        cls, attributes: JobAttributes | None, producer: SpanContext | None = None
    ) -> TraceLinks:
        """`producer`: the parsed `traceparent`, when the caller parsed it already."""
        if attributes is None:
            return cls(None, None, None)
        if producer is None:
            producer = span_context_of(attributes.traceparent, attributes.tracestate)
        origin = span_context_of(attributes.origin_traceparent, attributes.origin_tracestate)
        previous = span_context_of(attributes.extensions.get(PREVIOUS_ATTEMPT))
        # A job from a producer that sets no `joborigin`: its publish created it.
        return cls(origin or producer, producer, previous)

    def links(self, *, producer: bool) -> list[Link]:
        named = [("origin", self.origin), ("previous-attempt", self.previous)]
        if producer:
            named.append(("producer", self.producer))
        return [Link(ctx, {otel.LINK_TYPE: kind}) for kind, ctx in named if ctx is not None]


def job_attributes(attributes: JobAttributes) -> dict[str, str | int]:
    return {
        otel.MESSAGE_ID: attributes.id,
        otel.JOB_ID: attributes.id,
        otel.JOB_TYPE: attributes.type,
        otel.JOB_VERSION: attributes.version,
        otel.JOB_ATTEMPT: attributes.attempt,
    }


def record_failure(span: Span, error: BaseException) -> None:
    """The exception as an event and the span's status; a handler's exception is untrusted
    (its `__str__` may raise, its message be huge), so only its safe text is used."""
    text = error_text(error, 200)
    try:
        span.record_exception(error)
    except BaseException:  # noqa: BLE001 - the SDK calls str(error), which may raise anything
        span.add_event(
            "exception",
            {"exception.type": type(error).__name__, "exception.message": text},
        )
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {text}"[:200]))


class TracingStep:
    """The outermost step: see the module docstring."""

    def __init__(
        self,
        tracer: Tracer,
        *,
        system: str,
        group: str,
        attempt_parent: Literal["producer", "none"] = "producer",
    ) -> None:
        self._tracer = tracer
        self._system = system
        self._group = group
        self._child_of_producer = attempt_parent == "producer"
        self._start_attributes: dict[str, dict[str, str]] = {}

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        delivery = run.delivery
        attributes = run.attributes
        producer = None
        if attributes is not None and attributes.traceparent is not None:
            producer = span_context_of(attributes.traceparent, attributes.tracestate)
        parent = Context()  # a new trace, unless the producer's span is the parent
        if self._child_of_producer and producer is not None:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(producer))
        with self._tracer.start_as_current_span(
            f"process {delivery.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=self._at_start(delivery.topic),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if span.is_recording():
                # Only now: a span sampled out costs no parsing and no attribute cleaning.
                self._describe(span, run, TraceLinks.of(attributes, producer))
            try:
                outcome = await call_next(run)
            except asyncio.CancelledError:
                span.set_attribute(OUTCOME, "abandoned")
                raise
            except Exception as error:  # a runtime fault: the worker stops
                record_failure(span, error)
                raise
            span.set_attribute(OUTCOME, outcome.value)
            if run.failure_reason is not None:
                span.set_attribute(REASON, run.failure_reason)
            if run.error is not None and outcome in _FAILED:
                record_failure(span, run.error)
            return outcome

    def _at_start(self, topic: str) -> dict[str, str]:
        """What a sampler sees: the attributes known before the record is looked at."""
        found = self._start_attributes.get(topic)
        if found is None:
            found = self._start_attributes[topic] = {
                otel.SYSTEM: self._system,
                otel.OPERATION_NAME: "process",
                otel.OPERATION_TYPE: "process",
                otel.DESTINATION: topic,
                otel.CONSUMER_GROUP: self._group,
            }
        return found

    def _describe(self, span: Span, run: JobRun, found: TraceLinks) -> None:
        delivery, attributes = run.delivery, run.attributes
        described: dict[str, str | int] = {}
        partition = getattr(delivery.partition, "partition", None)
        if partition is not None:
            described[otel.PARTITION] = str(partition)
        if self._system == "kafka":
            described[otel.KAFKA_OFFSET] = delivery.offset
        if attributes is not None:
            described |= job_attributes(attributes)
            if attributes.key is not None and self._system == "kafka":
                described[otel.KAFKA_KEY] = attributes.key
        span.set_attributes(described)
        for link in found.links(producer=not self._child_of_producer):
            span.add_link(link.context, link.attributes)


@contextlib.contextmanager
def handing_off(
    tracer: Tracer,
    system: str,
    destination: str,
    attributes: JobAttributes | None,
    reason: str,
) -> Iterator[HandOff]:
    """A PRODUCER span around republishing a failed job to `destination` (see the module
    docstring); `HandOff.trace_headers()` is what the new record carries."""
    attempt = trace.get_current_span().get_span_context()
    found = TraceLinks.of(attributes)
    span_attributes: dict[str, str | int] = {
        otel.SYSTEM: system,
        otel.OPERATION_NAME: "send",
        otel.OPERATION_TYPE: "send",
        otel.DESTINATION: destination,
        REASON: reason,
    }
    if attributes is not None:
        span_attributes |= job_attributes(attributes)
    with tracer.start_as_current_span(
        f"send {destination}",
        kind=SpanKind.PRODUCER,
        attributes=span_attributes,
        links=found.links(producer=False)[:1],
    ) as span:
        yield HandOff(span, attempt, found)


@dataclass(frozen=True, slots=True)
class HandOff:
    span: Span
    attempt: SpanContext
    found: TraceLinks

    def trace_headers(self) -> dict[str, str | None]:
        """traceparent/tracestate of the hand-off span and the job*-extensions that keep
        the origin and name the failed attempt, for the republished record."""
        parent, state = traceparent_of(self.span.get_span_context())
        previous, _ = traceparent_of(self.attempt)
        headers: dict[str, str | None] = {"traceparent": parent, "tracestate": state}
        if previous is not None:
            headers[PREVIOUS_ATTEMPT] = previous
        return headers

    def describe(self, fields: Mapping[str, str | int | float]) -> None:
        if self.span.is_recording():
            self.span.set_attributes(fields)


@contextlib.contextmanager
def replaying(
    tracer: Tracer,
    system: str,
    destination: str,
    header: Callable[[str], str | None],
    replay_of: str,
) -> Iterator[HandOff]:
    """A PRODUCER span `send <destination>` around replaying a dead letter, a child of the
    caller's span (if any), linked to the job's origin, its last failed attempt and the
    dead-letter hand-off. `header(name)` reads the dead letter's headers (Kafka names)."""
    dead_letter = span_context_of(header("traceparent"), header("tracestate"))
    origin = span_context_of(header("ce_joborigin"), header("ce_joboriginstate"))
    previous = span_context_of(header(f"ce_{PREVIOUS_ATTEMPT}"))
    found = TraceLinks(origin or dead_letter, dead_letter, previous)
    links = found.links(producer=False)
    if dead_letter is not None:
        links.append(Link(dead_letter, {otel.LINK_TYPE: "dead-letter"}))
    span_attributes: dict[str, str | int] = {
        otel.SYSTEM: system,
        otel.OPERATION_NAME: "send",
        otel.OPERATION_TYPE: "send",
        otel.DESTINATION: destination,
        REPLAY_OF: replay_of,
    }
    for name, key in _REPLAYED_HEADERS:
        value = header(key)
        if value:
            span_attributes[name] = value
    version = header("ce_jobversion") or "1"
    span_attributes[otel.JOB_VERSION] = int(version) if version.isdigit() else 1
    span_attributes[otel.JOB_ATTEMPT] = 1
    with tracer.start_as_current_span(
        f"send {destination}", kind=SpanKind.PRODUCER, attributes=span_attributes, links=links
    ) as span:
        yield HandOff(span, trace.INVALID_SPAN_CONTEXT, found)


def retrace(
    headers: list[tuple[str, bytes]], hand_off: HandOff, prefix: str = "ce_"
) -> list[tuple[str, bytes]]:
    """`headers` (Kafka names) with the hand-off span as `traceparent`/`tracestate`, the
    failed attempt as `jobprevattempt` (when there is one), and the origin pinned: a record
    without `joborigin` gets its old `traceparent` as its origin, or, without that either,
    the failed attempt."""
    old = {name.lower(): value for name, value in headers}
    new = hand_off.trace_headers()
    if PREVIOUS_ATTEMPT in new:
        new[f"{prefix}{PREVIOUS_ATTEMPT}"] = new.pop(PREVIOUS_ATTEMPT)
    if f"{prefix}joborigin" not in old:
        if "traceparent" in old:
            new[f"{prefix}joborigin"] = old["traceparent"].decode(errors="replace")
            state = old.get("tracestate")
            new[f"{prefix}joboriginstate"] = state.decode(errors="replace") if state else None
        else:  # a job without any trace context: its failed attempt is where it began
            new[f"{prefix}joborigin"], new[f"{prefix}joboriginstate"] = traceparent_of(
                hand_off.attempt
            )
    replaced = {name.lower() for name in new}
    kept = [(name, value) for name, value in headers if name.lower() not in replaced]
    return kept + [(name, value.encode()) for name, value in new.items() if value]
