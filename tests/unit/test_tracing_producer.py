"""Publishing is a PRODUCER span; its context travels as `traceparent`, the caller's as the
job's origin. W3C header parsing never fails a job."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState

from producer import DestinationMissing, JobProducer, ProducerSettings, Receipt
from producer.memory import MemoryBroker, MemoryPublisher
from producer.tracecontext import span_context_of, traceparent_of
from schemas import JobAttributes, from_kafka
from schemas.examples import GenerateReport

REPORT = GenerateReport(account_id="acct-1", month="2025-01")
TOPIC = "jobs.report.generate"


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def producer_on(broker: MemoryBroker, provider: TracerProvider) -> JobProducer:
    settings = ProducerSettings(transport="memory", create_missing=True)
    producer = JobProducer(settings, publisher=MemoryPublisher(broker), tracer_provider=provider)
    await producer.start()
    return producer


def published(broker: MemoryBroker, receipt: Receipt) -> JobAttributes:
    record = broker.read(receipt.destination, receipt.partition or 0, receipt.offset)[0]
    return from_kafka(record.key, record.headers)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_publish_is_a_producer_span_and_the_caller_is_the_origin(recorded) -> None:
    provider, exporter = recorded
    broker = MemoryBroker()
    producer = await producer_on(broker, provider)
    with provider.get_tracer("t").start_as_current_span("POST /signup") as request:
        receipt = await producer.publish(REPORT, key="acct-1")
    [publish] = by_name(exporter.get_finished_spans(), f"send {receipt.destination}")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == request.get_span_context().span_id
    assert dict(publish.attributes or {}) == {
        "messaging.system": "memory",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": receipt.destination,
        "messaging.destination.partition.id": str(receipt.partition),
        "messaging.message.id": receipt.job_id,
        "messaging.kafka.message.key": "acct-1",
        "jobstream.job.id": receipt.job_id,
        "jobstream.job.type": "report.generate",
        "jobstream.job.version": 1,
        "jobstream.job.attempt": 1,
    }
    attributes = published(broker, receipt)
    assert attributes.traceparent == traceparent(publish.context)
    assert attributes.origin_traceparent == traceparent(request.get_span_context())


async def test_without_a_caller_span_the_publish_is_the_origin(recorded) -> None:
    provider, exporter = recorded
    broker = MemoryBroker()
    producer = await producer_on(broker, provider)
    receipt = await producer.publish(REPORT)
    [publish] = exporter.get_finished_spans()
    assert publish.parent is None
    attributes = published(broker, receipt)
    assert attributes.traceparent == attributes.origin_traceparent == traceparent(publish.context)


async def test_publish_many_gives_each_job_its_creation_span(recorded) -> None:
    provider, exporter = recorded
    broker = MemoryBroker()
    producer = await producer_on(broker, provider)
    with provider.get_tracer("t").start_as_current_span("nightly") as request:
        receipts = await producer.publish_many([REPORT, REPORT, REPORT])
    spans = exporter.get_finished_spans()
    created = by_name(spans, f"create {TOPIC}")
    [send] = by_name(spans, f"send {TOPIC}")
    assert len(created) == 3
    assert {span.kind for span in created} == {SpanKind.PRODUCER}
    assert send.kind is SpanKind.CLIENT
    assert (send.attributes or {})["messaging.batch.message_count"] == 3
    request_id = request.get_span_context().span_id
    assert {span.parent.span_id for span in [*created, send] if span.parent} == {request_id}
    for receipt, span in zip(receipts, created, strict=True):
        attributes = published(broker, receipt)
        assert attributes.traceparent == traceparent(span.context)
        assert attributes.origin_traceparent == traceparent(request.get_span_context())
        assert (span.attributes or {})["messaging.message.id"] == receipt.job_id


async def test_a_failed_publish_is_an_error_span(recorded) -> None:
    provider, exporter = recorded
    settings = ProducerSettings(transport="memory", create_missing=False)
    producer = JobProducer(
        settings, publisher=MemoryPublisher(MemoryBroker()), tracer_provider=provider
    )
    await producer.start()
    with pytest.raises(DestinationMissing):
        await producer.publish(REPORT)
    [publish] = exporter.get_finished_spans()
    assert publish.status.is_ok is False
    assert [event.name for event in publish.events] == ["exception"]


def test_traceparent_round_trip_keeps_flags_and_state() -> None:
    context = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(0x03),
        trace_state=TraceState([("congo", "t61rcWkgMzE")]),
    )
    parent, state = traceparent_of(context)
    assert parent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
    assert state == "congo=t61rcWkgMzE"
    assert span_context_of(parent, state) == context


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has 4 fields
    ],
)
def test_a_malformed_traceparent_names_no_context(header: str | None) -> None:
    assert span_context_of(header) is None
    assert traceparent_of(SpanContext(0, 0, is_remote=False)) == (None, None)
