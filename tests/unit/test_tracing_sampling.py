"""The tracing step decides sampling before the SDK span (`Presampler`): the same decision,
the same non-recording span and the same current context as the SDK makes, for every
sampler `OTEL_TRACES_SAMPLER` can name; any other sampler is asked by the SDK alone, once
per attempt, with every attribute and link."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.util.types import Attributes

from consumer.core import Delivery, JobRun, Outcome
from consumer.telemetry import TracingStep
from consumer.telemetry._tracing import Presampler, record_failure
from schemas import encode
from schemas.examples import GenerateReport

SAMPLERS = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "traceidratio 0.5": TraceIdRatioBased(0.5),
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
    "parentbased_traceidratio 0.5": ParentBasedTraceIdRatio(0.5),
    "parentbased, not sampled parents at 0.5": ParentBased(
        ALWAYS_ON, remote_parent_not_sampled=TraceIdRatioBased(0.5)
    ),
}


def run_with(traceparent: str, tracestate: str | None = None) -> JobRun:
    message = encode(
        GenerateReport(account_id="a", month="2025-01"),
        source="/t",
        traceparent=traceparent,
        tracestate=tracestate,
        origin_traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    delivery = Delivery(3, 7, "jobs.t", message.attributes, b"{}")
    return JobRun(delivery, None, None, None)


def traceparents(count: int) -> list[str]:
    rng = random.Random(16)
    return [
        f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) or 1:016x}-{rng.choice(['00', '01', '02', '03'])}"
        for _ in range(count)
    ]


@pytest.mark.parametrize("name", list(SAMPLERS))
async def test_the_decision_and_the_current_span_are_the_sdks(name: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=SAMPLERS[name])
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    assert Presampler.of(tracer) is not None
    step = TracingStep(tracer, system="kafka", group="g")
    seen: list[SpanContext] = []

    async def handler(run: JobRun) -> Outcome:
        seen.append(trace.get_current_span().get_span_context())
        return Outcome.COMPLETED

    expected: list[tuple[int, int, TraceState]] = []
    for traceparent in traceparents(200):
        run = run_with(traceparent, "vendor=1")
        await step(run, handler)
        producer = trace.NonRecordingSpan(
            SpanContext(
                int(traceparent[3:35], 16),
                int(traceparent[36:52], 16),
                is_remote=True,
                trace_flags=TraceFlags(int(traceparent[53:], 16)),
                trace_state=TraceState([("vendor", "1")]),
            )
        )
        sdk = tracer.start_span("process jobs.t", trace.set_span_in_context(producer, Context()))
        context = sdk.get_span_context()
        expected.append((int(context.trace_flags), context.trace_id, context.trace_state))
    provider.shutdown()
    assert [(int(c.trace_flags), c.trace_id, c.trace_state) for c in seen] == expected
    assert all(c.is_valid and not c.is_remote for c in seen)
    producers = {int(tp[36:52], 16) for tp in traceparents(200)}
    assert not producers & {c.span_id for c in seen}, "each attempt has a span id of its own"
    recorded = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.CONSUMER]
    assert len(recorded) == sum(flags & 1 for flags, _, _ in expected)
    if name == "traceidratio 0.5":
        assert 0 < len(recorded) < 200


async def test_a_recorded_attempt_has_every_attribute_and_link_from_its_start() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=DEFAULT_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    step = TracingStep(provider.get_tracer("t"), system="kafka", group="g")
    run = run_with("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01")

    async def handler(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    await step(run, handler)
    provider.shutdown()
    [span] = exporter.get_finished_spans()
    assert run.attributes is not None
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": "jobs.t",
        "messaging.consumer.group.name": "g",
        "messaging.kafka.offset": 7,
        "messaging.message.id": run.attributes.id,
        "jobstream.job.id": run.attributes.id,
        "jobstream.job.type": "report.generate",
        "jobstream.job.version": 1,
        "jobstream.job.attempt": 1,
        "jobstream.job.outcome": "completed",
    }
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == "1111111111111111"
    assert [
        (f"{link.context.span_id:016x}", dict(link.attributes or {})) for link in span.links
    ] == [("b7ad6b7169203331", {"jobstream.link.type": "origin"})]


class CountingSampler(Sampler):
    """A sampler of the application's: it may count, so it is asked once per span."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        self.calls.append(len(attributes or {}))
        return ALWAYS_OFF.should_sample(parent_context, trace_id, name, kind, attributes, links)

    def get_description(self) -> str:
        return "counting"


class SubclassedRatio(TraceIdRatioBased):
    """Same name, another module: not the SDK's, so not presampled."""


async def test_another_sampler_is_asked_by_the_sdk_alone_with_everything() -> None:
    sampler = CountingSampler()
    provider = TracerProvider(sampler=sampler)
    tracer = provider.get_tracer("t")
    assert Presampler.of(tracer) is None
    assert Presampler.of(TracerProvider(sampler=SubclassedRatio(0.5)).get_tracer("t")) is None
    remote = ParentBased(ALWAYS_ON, remote_parent_sampled=sampler)
    assert Presampler.of(TracerProvider(sampler=remote).get_tracer("t")) is None
    # A root sampler is never asked for an attempt with a parent: presampled all the same.
    assert Presampler.of(TracerProvider(sampler=ParentBased(sampler)).get_tracer("t"))
    step = TracingStep(tracer, system="kafka", group="g")

    async def handler(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    for traceparent in traceparents(5):
        await step(run_with(traceparent), handler)
    provider.shutdown()
    assert sampler.calls == [11] * 5  # once per attempt, every attribute known at start


def test_a_hostile_exception_is_recorded_printable_and_bounded() -> None:
    """Found by a new user: an error message with a lone surrogate made the OTLP exporter
    fail on every batch holding its span (`Span.record_exception` takes the text raw);
    a huge message went in whole."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("job") as span:
        try:
            raise ValueError("bad \ud800 " + "x" * 100_000 + " \ud800 end")
        except ValueError as error:
            record_failure(span, error)
    [finished] = exporter.get_finished_spans()
    [event] = finished.events
    attributes = event.attributes or {}
    message = str(attributes["exception.message"])
    assert message.startswith("bad ? x") and len(message.encode()) <= 200
    stacktrace = str(attributes["exception.stacktrace"])
    assert stacktrace.endswith("? end\n") and len(stacktrace.encode()) <= 4000
    encode_spans([finished]).SerializeToString()  # raised UnicodeEncodeError before
