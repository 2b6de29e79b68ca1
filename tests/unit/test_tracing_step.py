"""The tracing step and the hand-off helpers, without a broker: edge cases the Kafka test
does not reach (bad headers, undecodable records, cut-off jobs, foreign producers), the
log fields, and that telemetry off leaves the pipeline untouched."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from consumer import App, Settings, Worker
from consumer.core import Delivery, JobRun, Outcome
from consumer.runtime._record_routing import _traced
from consumer.telemetry import (
    HandOff,
    JsonFormatter,
    TextFormatter,
    TraceLinks,
    TracingStep,
    handing_off,
    retrace,
)
from schemas import InvalidAttributes, JobAttributes, encode
from schemas.examples import GenerateReport

PUBLISH = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def attributes_with(**trace: str | None) -> JobAttributes:
    message = encode(
        GenerateReport(account_id="a", month="2025-01"),
        source="/t",
        traceparent=trace.get("traceparent"),
        origin_traceparent=trace.get("origin"),
    )
    if "origin" in trace and trace["origin"] is None:
        return message.attributes.replace(origin_traceparent=None)
    return message.attributes


def run_of(attributes: JobAttributes | None, error: Exception | None = None) -> JobRun:
    delivery = Delivery(partition=3, offset=7, topic="jobs.t", attributes=attributes, body=b"{}")
    return JobRun(delivery, None, None, None, error=error)


def step(provider: TracerProvider) -> TracingStep:
    return TracingStep(provider.get_tracer("t"), system="kafka", group="g")


def traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def link_types(span: ReadableSpan) -> list[str]:
    return [str((link.attributes or {})["jobstream.link.type"]) for link in span.links]


async def test_a_malformed_traceparent_only_loses_the_links(recorded) -> None:
    provider, exporter = recorded

    async def complete(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    attributes = attributes_with(traceparent="not-a-traceparent", origin="00-zz")
    assert await step(provider)(run_of(attributes), complete) is Outcome.COMPLETED
    [span] = exporter.get_finished_spans()
    assert span.parent is None
    assert span.links == ()
    assert (span.attributes or {})["jobstream.job.outcome"] == "completed"


async def test_a_job_without_joborigin_links_its_publish_as_origin(recorded) -> None:
    provider, exporter = recorded

    async def complete(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    await step(provider)(run_of(attributes_with(traceparent=PUBLISH, origin=None)), complete)
    [span] = exporter.get_finished_spans()
    assert span.parent is not None
    assert span.parent.span_id == 0x1111111111111111
    assert link_types(span) == ["origin"]
    assert span.links[0].context.span_id == 0x1111111111111111


async def test_an_undecodable_record_is_an_error_span_without_job_attributes(recorded) -> None:
    provider, exporter = recorded
    error = InvalidAttributes("no ce_id header")

    async def dead_letter(run: JobRun) -> Outcome:
        run.error, run.failure_reason = error, "invalid-attributes"
        return Outcome.DEAD_LETTERED

    await step(provider)(run_of(None), dead_letter)
    [span] = exporter.get_finished_spans()
    assert span.name == "process jobs.t"
    assert span.kind is SpanKind.CONSUMER
    assert span.status.status_code is StatusCode.ERROR
    found = dict(span.attributes or {})
    assert [name for name in found if name.startswith("jobstream.job.")] == [
        "jobstream.job.outcome"
    ]
    assert found["jobstream.job.outcome"] == "dead_lettered"
    assert found["jobstream.failure.reason"] == "invalid-attributes"
    assert "messaging.destination.partition.id" not in found  # a bare partition number
    assert found["messaging.kafka.offset"] == 7


async def test_a_cut_off_job_ends_its_span_as_abandoned(recorded) -> None:
    provider, exporter = recorded

    async def cut_off(run: JobRun) -> Outcome:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await step(provider)(run_of(attributes_with(traceparent=PUBLISH)), cut_off)
    [span] = exporter.get_finished_spans()
    assert (span.attributes or {})["jobstream.job.outcome"] == "abandoned"
    assert span.status.status_code is StatusCode.UNSET


async def test_handing_off_names_the_attempt_and_keeps_the_origin(recorded) -> None:
    provider, exporter = recorded
    tracer = provider.get_tracer("t")
    attributes = attributes_with(traceparent=PUBLISH, origin=None)  # a foreign producer
    with (
        tracer.start_as_current_span("process jobs.t") as attempt,
        handing_off(tracer, "kafka", "jobs.t.dlq", attributes, "non-retriable") as hand_off,
    ):
        headers = retrace([("traceparent", PUBLISH.encode()), ("ce_id", b"1")], hand_off)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    sent = spans["send jobs.t.dlq"]
    assert sent.kind is SpanKind.PRODUCER
    assert link_types(sent) == ["origin"]
    found = dict((name, value.decode()) for name, value in headers)
    assert found["traceparent"] == traceparent(sent.context)
    assert found["ce_joborigin"] == PUBLISH  # pinned: the first publish created the job
    assert found["ce_jobprevattempt"] == traceparent(attempt.get_span_context())
    assert found["ce_id"] == "1"
    assert isinstance(hand_off, HandOff)


def test_log_lines_carry_the_ids_of_the_current_span(recorded) -> None:
    provider, _ = recorded
    record = logging.LogRecord(
        "jobstream.job", logging.INFO, __file__, 1, "job completed", None, None
    )
    record.job = {"job_id": "j1"}
    assert "trace_id" not in json.loads(JsonFormatter().format(record))
    with provider.get_tracer("t").start_as_current_span("process jobs.t") as span:
        line = json.loads(JsonFormatter().format(record))
        text = TextFormatter("%(message)s").format(record)
    context = span.get_span_context()
    assert line["job_id"] == "j1"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert text == f"job completed job_id=j1 trace_id={context.trace_id:032x} " + (
        f"span_id={context.span_id:016x}"
    )


def test_telemetry_off_adds_no_step() -> None:
    worker = Worker(App("quiet"), Settings(), source=None)  # type: ignore[arg-type]
    assert worker.telemetry.tracing is False
    assert worker.telemetry.metrics is False
    assert worker._telemetry_steps() == []


def test_a_job_without_trace_context_takes_its_first_attempt_as_origin(recorded) -> None:
    provider, _ = recorded
    tracer = provider.get_tracer("t")
    untraced = attributes_with()
    assert untraced.traceparent is None
    assert untraced.origin_traceparent is None
    with (
        tracer.start_as_current_span("process jobs.t") as attempt,
        handing_off(tracer, "kafka", "jobs.t.retry.1", untraced, "error") as hand_off,
    ):
        retried = _traced(untraced.replace(attempt=2), hand_off)
        dead = dict(retrace([("ce_id", b"1")], hand_off))
    first = traceparent(attempt.get_span_context())
    assert retried.origin_traceparent == first
    assert retried.extensions["jobprevattempt"] == first
    assert retried.traceparent == traceparent(hand_off.span.get_span_context())
    assert dead["ce_joborigin"] == first.encode()
    # The next attempt links that first attempt as the origin, and as the previous one.
    assert [link.context.span_id for link in TraceLinks.of(retried).links(producer=False)] == [
        attempt.get_span_context().span_id,
        attempt.get_span_context().span_id,
    ]
