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
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
)

from consumer.core import JobRun, Next, Outcome, error_text, traceback_text
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
    """The exception as an event (the semantic conventions' `exception` event) and the
    span's status. A handler's exception is untrusted: its `__str__` may raise, its
    message be huge or hold lone surrogates an exporter cannot encode, so only its safe
    text and a bounded, printable traceback are used (not `Span.record_exception`, which
    takes them raw)."""
    text = error_text(error, 200)
    span.add_event(
        "exception",
        {
            "exception.type": type(error).__name__,
            "exception.message": text,
            "exception.stacktrace": traceback_text(error),
        },
    )
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {text}"[:200]))


class TracingStep:
    """The outermost step: see the module docstring.

    Per job it parses the record's `traceparent` once and starts the span with every
    attribute and link in one call (no `start_as_current_span` context manager). With the
    SDK's own samplers (`Presampler`) the decision comes first: an attempt sampled out is
    the same non-recording span the SDK would make, built without attributes, links, a
    parent context or a call into the SDK."""

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
        self._kafka = system == "kafka"
        self._group = group
        self._child_of_producer = attempt_parent == "producer"
        self._presampler = Presampler.of(tracer) if self._child_of_producer else None
        self._by_topic: dict[str, tuple[str, dict[str, str]]] = {}

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        attributes = run.attributes
        name, at_start = self._named(run.delivery.topic)
        span: Span | None = None
        producer: SpanContext | None = None
        if self._presampler is not None and attributes is not None and attributes.traceparent:
            decided = self._presampler.decide(attributes.traceparent, attributes.tracestate)
            if isinstance(decided, SpanContext):
                producer = decided
            else:
                span = decided
        if span is None:
            if producer is None and attributes is not None and attributes.traceparent is not None:
                producer = span_context_of(attributes.traceparent, attributes.tracestate)
            parent = _NEW_TRACE
            if self._child_of_producer and producer is not None:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(producer))
            span = self._tracer.start_span(
                name,
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=self._described(run, at_start),
                links=TraceLinks.of(attributes, producer).links(
                    producer=not self._child_of_producer
                ),
                record_exception=False,
                set_status_on_exception=False,
            )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            outcome = await call_next(run)
        except asyncio.CancelledError:
            span.set_attribute(OUTCOME, "abandoned")
            raise
        except Exception as error:  # a runtime fault: the worker stops
            if span.is_recording():
                record_failure(span, error)
            raise
        else:
            if span.is_recording():
                _describe_end(span, run, outcome)
            return outcome
        finally:
            otel_context.detach(token)
            span.end()

    def _named(self, topic: str) -> tuple[str, dict[str, str]]:
        """The span name and the attributes known before the record is looked at."""
        found = self._by_topic.get(topic)
        if found is None:
            found = self._by_topic[topic] = (
                f"process {topic}",
                {
                    otel.SYSTEM: self._system,
                    otel.OPERATION_NAME: "process",
                    otel.OPERATION_TYPE: "process",
                    otel.DESTINATION: topic,
                    otel.CONSUMER_GROUP: self._group,
                },
            )
        return found

    def _described(self, run: JobRun, at_start: dict[str, str]) -> dict[str, str | int]:
        delivery, attributes = run.delivery, run.attributes
        described: dict[str, str | int] = dict(at_start)
        partition = getattr(delivery.partition, "partition", None)
        if partition is not None:
            described[otel.PARTITION] = str(partition)
        if self._kafka:
            described[otel.KAFKA_OFFSET] = delivery.offset
        if attributes is not None:
            described[otel.MESSAGE_ID] = attributes.id
            described[otel.JOB_ID] = attributes.id
            described[otel.JOB_TYPE] = attributes.type
            described[otel.JOB_VERSION] = attributes.version
            described[otel.JOB_ATTEMPT] = attributes.attempt
            if attributes.key is not None and self._kafka:
                described[otel.KAFKA_KEY] = attributes.key
        return described


def _describe_end(span: Span, run: JobRun, outcome: Outcome) -> None:
    ended: dict[str, str] = {OUTCOME: outcome.value}
    if run.failure_reason is not None:
        ended[REASON] = run.failure_reason
    span.set_attributes(ended)
    if run.error is not None and outcome in _FAILED:
        record_failure(span, run.error)


_NEW_TRACE = Context()
"""The parent of an attempt that starts a trace of its own (`attempt_parent = "none"`)."""


class Presampler:
    """The SDK sampler's decision for an attempt whose parent is the producer's span, made
    from the record's `traceparent` before anything else, and the non-recording span the
    SDK makes of a drop.

    Only for the SDK's own samplers (the `OTEL_TRACES_SAMPLER` ones: `always_on`,
    `always_off`, `traceidratio`, `parentbased_*`), whose decision for a remote parent is
    a function of its sampled flag and the trace id, and which keep the parent's
    `tracestate`: the decision is that function, without the sampler's objects."""

    __slots__ = ("_keeps", "_span_ids")

    def __init__(self, keeps: Callable[[int, bool], bool], span_ids: IdGenerator) -> None:
        self._keeps = keeps
        self._span_ids = span_ids

    @classmethod
    def of(cls, tracer: Tracer) -> Presampler | None:
        """None for a tracer that is not the SDK's, or a sampler of another kind (it may
        count, rate-limit or look at attributes: the SDK asks it, with everything)."""
        if not isinstance(tracer, SdkTracer):
            return None
        keeps = _decision_of(tracer.sampler)
        return None if keeps is None else cls(keeps, tracer.id_generator)

    def decide(self, traceparent: str, tracestate: str | None) -> Span | SpanContext | None:
        """For the producer's `traceparent`: the span the SDK would start as its child if
        the sampler drops it; if the sampler keeps it, the producer's span context (what
        `span_context_of` reads); None for anything but a plain valid version-00
        `traceparent` (the full parse, then the SDK, decide)."""
        match = _TRACEPARENT_00.fullmatch(traceparent)
        if match is None:
            return None
        trace_id, span_id, flags = int(match[1], 16), int(match[2], 16), int(match[3], 16)
        if not trace_id or not span_id:
            return None
        state = TraceState.from_header([tracestate]) if tracestate else None
        if self._keeps(trace_id, bool(flags & TraceFlags.SAMPLED)):
            return SpanContext(
                trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=state
            )
        context = SpanContext(
            trace_id,
            self._span_ids.generate_span_id(),
            is_remote=False,
            trace_flags=_DROPPED_RANDOM if flags & TraceFlags.RANDOM_TRACE_ID else _DROPPED,
            trace_state=state,
        )
        return trace.NonRecordingSpan(context)


_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_DROPPED = TraceFlags(TraceFlags.DEFAULT)
_DROPPED_RANDOM = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)


def _decision_of(sampler: object) -> Callable[[int, bool], bool] | None:
    """`keeps(trace_id, parent_sampled)` of an SDK sampler for a remote parent, or None for
    a sampler of another kind."""
    if type(sampler).__module__ != sampling.__name__:  # a subclass from elsewhere: unknown
        return None
    if isinstance(sampler, StaticSampler):
        keep = sampler.should_sample(None, 1, "probe").decision is not Decision.DROP
        return lambda _, __: keep
    if isinstance(sampler, TraceIdRatioBased):
        bound, limit = sampler.bound, sampler.TRACE_ID_LIMIT
        return lambda trace_id, _: trace_id & limit < bound
    if isinstance(sampler, ParentBased):
        sampled = _decision_of(getattr(sampler, "_remote_parent_sampled", None))
        not_sampled = _decision_of(getattr(sampler, "_remote_parent_not_sampled", None))
        if sampled is None or not_sampled is None:
            return None
        return lambda trace_id, parent_sampled: (sampled if parent_sampled else not_sampled)(
            trace_id, parent_sampled
        )
    return None


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
