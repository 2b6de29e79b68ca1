"""The publishing code's W3C trace context travels with the job, as its origin too.

The SDK is used here only to have real spans; the producer itself needs the API alone.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from producer import JobProducer, ProducerSettings, Receipt
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import JobAttributes, from_kafka
from schemas.examples import GenerateReport

REPORT = GenerateReport(account_id="acct-1", month="2025-01")
tracer = TracerProvider().get_tracer("tests")


def traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def published(broker: MemoryBroker, receipt: Receipt) -> JobAttributes:
    record = broker.read(receipt.destination, receipt.partition or 0, receipt.offset)[0]
    return from_kafka(record.key, record.headers)


async def producer_on(broker: MemoryBroker) -> JobProducer:
    settings = ProducerSettings(transport="memory", create_missing=True)
    producer = JobProducer(settings, publisher=MemoryPublisher(broker))
    await producer.start()
    return producer


async def test_current_span_becomes_traceparent_and_origin() -> None:
    broker = MemoryBroker()
    producer = await producer_on(broker)
    with tracer.start_as_current_span("POST /signup") as span:
        receipt = await producer.publish(REPORT)
        [bulk] = await producer.publish_many([REPORT])
    expected = traceparent(span.get_span_context())
    for attributes in [await published(broker, receipt), await published(broker, bulk)]:
        assert attributes.traceparent == expected
        assert attributes.origin_traceparent == expected
        assert attributes.tracestate is None


async def test_tracestate_travels_with_it() -> None:
    broker = MemoryBroker()
    producer = await producer_on(broker)
    context = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("congo", "t61rcWkgMzE")]),
    )
    with trace.use_span(NonRecordingSpan(context)):
        receipt = await producer.publish(REPORT)
    attributes = await published(broker, receipt)
    assert attributes.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert attributes.tracestate == attributes.origin_tracestate == "congo=t61rcWkgMzE"


async def test_no_active_span_means_no_trace_headers() -> None:
    broker = MemoryBroker()
    producer = await producer_on(broker)
    receipt = await producer.publish(REPORT)
    record = broker.read(receipt.destination, 0, receipt.offset)[0]
    names = {name for name, _ in record.headers}
    assert not names & {"traceparent", "tracestate", "ce_joborigin", "ce_joboriginstate"}
