"""G7 on real Kafka, recorded with the in-memory span exporter: every span of a job's life.

A request span publishes a job; its first attempt fails, the retry fails too, the job is
dead-lettered, the handler is fixed and the dead letter replayed, and the replay succeeds.
Every span's kind, name, key attributes, parent and links are checked, and so are the
trace context headers of the retry, dead-letter and replayed records: the origin survives
all of them unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from consumer import App, JobContext, Settings, Worker, open_worker
from consumer.core import DeadLetterFilter, DeadLetterRecord
from consumer.kafka import list_dead_letters, read_topics, replay
from consumer.telemetry import JsonFormatter, Telemetry
from producer import JobProducer
from schemas import Job
from tests.conftest import KAFKA_BOOTSTRAP
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class TraceJob(Job, type="test.trace", version=1, register=False):
    n: int


class Handler:
    """Fails while `broken`; records a span of its own inside the processing span."""

    def __init__(self, provider: TracerProvider, *, broken: bool = True) -> None:
        self.broken = broken
        self.provider = provider
        self.done: list[int] = []

    def app(self) -> App:
        app = App("traced")

        @app.handler(TraceJob)
        async def handle(job: TraceJob, ctx: JobContext) -> None:
            with self.provider.get_tracer("test.handler").start_as_current_span("handler work"):
                if self.broken:
                    raise RuntimeError(f"attempt {ctx.attempt} of job {job.n} fails")
                ctx.logger.info("done")
                self.done.append(job.n)

        return app


@pytest.fixture
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def job_log() -> Iterator[io.StringIO]:
    """The JSON lines the worker writes (`jobstream.job` and `jobstream.handler`)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in ("jobstream.job", "jobstream.handler")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield out
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


async def routed_topic(new_topic) -> str:
    topic = await new_topic(partitions=1)
    for suffix in (".retry.1", ".retry.2", ".dlq"):
        await new_topic(partitions=1, name=topic + suffix)
    return topic


def settings_for(topic: str, group: str, **telemetry: str) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": KAFKA_BOOTSTRAP},
        routing={"routes": {"test.trace": topic}},
        worker={"group": group, "commit_interval_s": 0.2},
        retry={
            "tiers_s": [0.2, 1.0],
            "policy": {"max_attempts": 2, "initial_delay_s": 0.2, "jitter": 0.0},
        },
        telemetry=telemetry,
    )


@contextlib.asynccontextmanager
async def traced_worker(
    app: App, settings: Settings, provider: TracerProvider
) -> AsyncIterator[Worker]:
    telemetry = Telemetry(provider, metrics.NoOpMeterProvider(), tracing=True, metrics=False)
    async with open_worker(app, settings, telemetry=telemetry) as worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await task


def traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def links_of(span: ReadableSpan) -> list[tuple[str, int, int]]:
    return [
        (str(link.attributes["jobstream.link.type"]), link.context.trace_id, link.context.span_id)
        for link in span.links
    ]


def ids(span: ReadableSpan, kind: str) -> tuple[str, int, int]:
    return kind, span.context.trace_id, span.context.span_id


def parent_of(span: ReadableSpan) -> tuple[int, int] | None:
    return None if span.parent is None else (span.parent.trace_id, span.parent.span_id)


def is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return parent_of(span) == (parent.context.trace_id, parent.context.span_id)


def header(record: DeadLetterRecord, name: str) -> str | None:
    return record.header(name)


async def test_request_publish_retry_dead_letter_replay_spans_and_links(
    new_topic, group_id, recorded, job_log
) -> None:
    provider, exporter = recorded
    topic = await routed_topic(new_topic)
    settings = settings_for(topic, group_id)
    handler = Handler(provider)
    app = handler.app()

    request_tracer = provider.get_tracer("test.request")
    async with traced_worker(app, settings, provider):
        async with JobProducer(settings, tracer_provider=provider) as producer:
            with request_tracer.start_as_current_span("POST /signup", kind=SpanKind.SERVER):
                receipt = await producer.publish(TraceJob(n=1), key="user-1")
        dead: list[DeadLetterRecord] = []

        async def dead_lettered() -> bool:
            dead[:] = await list_dead_letters(settings, [f"{topic}.dlq"], DeadLetterFilter())
            return bool(dead)

        await until(dead_lettered, "the dead letter")
        handler.broken = False
        [result] = await replay(settings, dead, tracer_provider=provider)
        assert result.status == "replayed"
        await wait_until(lambda: handler.done == [1], 30, "the replayed job")
    job_id = receipt.job_id

    spans = list(exporter.get_finished_spans())
    [request] = named(spans, "POST /signup")
    publish, replayed = sorted(named(spans, f"send {topic}"), key=lambda s: s.start_time or 0)
    [to_retry] = named(spans, f"send {topic}.retry.1")
    [to_dlq] = named(spans, f"send {topic}.dlq")
    first, retry, again = sorted(
        (s for s in spans if s.kind is SpanKind.CONSUMER), key=lambda s: s.start_time or 0
    )
    work = named(spans, "handler work")
    assert len(spans) == 11, sorted(s.name for s in spans)
    origin = ids(request, "origin")

    # The request and the publish.
    assert request.parent is None
    assert publish.kind is SpanKind.PRODUCER
    assert is_child(publish, request)
    assert publish.links == ()
    assert_has(
        publish,
        {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": "0",
            "messaging.kafka.offset": receipt.offset,
            "messaging.message.id": job_id,
            "messaging.kafka.message.key": "user-1",
            "jobstream.job.id": job_id,
            "jobstream.job.type": "test.trace",
            "jobstream.job.version": 1,
            "jobstream.job.attempt": 1,
        },
    )

    # Attempt 1 fails: a child of the publish, linked to the origin, handed to tier 1.
    assert first.name == f"process {topic}"
    assert is_child(first, publish)
    assert links_of(first) == [origin]
    assert_has(
        first,
        {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": "0",
            "messaging.kafka.offset": 0,
            "messaging.consumer.group.name": group_id,
            "messaging.message.id": job_id,
            "messaging.kafka.message.key": "user-1",
            "jobstream.job.id": job_id,
            "jobstream.job.type": "test.trace",
            "jobstream.job.version": 1,
            "jobstream.job.attempt": 1,
            "jobstream.job.outcome": "retrying",
            "jobstream.failure.reason": "error",
        },
    )
    assert_failed(first, "attempt 1 of job 1 fails")
    assert to_retry.kind is SpanKind.PRODUCER
    assert is_child(to_retry, first)
    assert links_of(to_retry) == [origin]
    assert_has(
        to_retry,
        {
            "messaging.operation.type": "send",
            "messaging.destination.name": f"{topic}.retry.1",
            "jobstream.job.id": job_id,
            "jobstream.job.attempt": 1,
            "jobstream.failure.reason": "error",
            "jobstream.retry.delay_s": 0.2,
        },
    )
    assert to_retry.status.status_code is StatusCode.UNSET

    # Attempt 2 (from the tier) fails: a child of the hand-off, linked to the origin and
    # to attempt 1; the job goes to the dead-letter topic.
    assert retry.name == f"process {topic}.retry.1"
    assert is_child(retry, to_retry)
    assert links_of(retry) == [origin, ids(first, "previous-attempt")]
    assert_has(
        retry,
        {
            "messaging.destination.name": f"{topic}.retry.1",
            "messaging.kafka.offset": 0,
            "jobstream.job.id": job_id,
            "jobstream.job.attempt": 2,
            "jobstream.job.outcome": "dead_lettered",
            "jobstream.failure.reason": "retries-exhausted",
        },
    )
    assert_failed(retry, "attempt 2 of job 1 fails")
    assert to_dlq.kind is SpanKind.PRODUCER
    assert is_child(to_dlq, retry)
    assert links_of(to_dlq) == [origin]
    assert_has(
        to_dlq,
        {
            "messaging.destination.name": f"{topic}.dlq",
            "jobstream.job.attempt": 2,
            "jobstream.failure.reason": "retries-exhausted",
        },
    )

    # The replay: a new trace (no ambient span), linked to the origin, the last attempt and
    # the dead-lettering; the replayed attempt is its child and succeeds.
    assert replayed.kind is SpanKind.PRODUCER
    assert replayed.parent is None
    assert links_of(replayed) == [
        origin,
        ids(retry, "previous-attempt"),
        ids(to_dlq, "dead-letter"),
    ]
    assert_has(
        replayed,
        {
            "messaging.destination.name": topic,
            "jobstream.replay.of": dead[0].id,
            "jobstream.job.id": job_id,
            "jobstream.job.attempt": 1,
        },
    )
    assert again.name == f"process {topic}"
    assert is_child(again, replayed)
    assert links_of(again) == [origin, ids(retry, "previous-attempt")]
    assert_has(
        again,
        {
            "messaging.kafka.offset": 1,
            "jobstream.job.attempt": 1,
            "jobstream.job.outcome": "completed",
        },
    )
    assert again.status.status_code is StatusCode.UNSET
    assert not [event for event in again.events if event.name == "exception"]

    # Handlers' spans nest under their attempt.
    assert sorted(parent_of(s) for s in work) == sorted(
        (a.context.trace_id, a.context.span_id) for a in (first, retry, again)
    )
    assert all(s.kind is SpanKind.INTERNAL for s in work)
    # One trace from the request to the dead letter; the replay starts another.
    request_trace = {s.context.trace_id for s in (request, publish, first, to_retry, retry, to_dlq)}
    assert request_trace == {request.context.trace_id}
    assert again.context.trace_id == replayed.context.trace_id != request.context.trace_id

    # On the wire: the origin never changes; traceparent is the span that wrote the record.
    records = {
        name: await read_topics(settings, [name])
        for name in (topic, f"{topic}.retry.1", f"{topic}.dlq")
    }
    want_origin = traceparent(request.context)
    for record in [*records[topic], *records[f"{topic}.retry.1"], *records[f"{topic}.dlq"]]:
        assert header(record, "ce_joborigin") == want_origin, record.id
    original, replay_record = records[topic]
    assert header(original, "traceparent") == traceparent(publish.context)
    [retry_record] = records[f"{topic}.retry.1"]
    assert header(retry_record, "traceparent") == traceparent(to_retry.context)
    assert header(retry_record, "ce_jobprevattempt") == traceparent(first.context)
    [dlq_record] = records[f"{topic}.dlq"]
    assert header(dlq_record, "traceparent") == traceparent(to_dlq.context)
    assert header(dlq_record, "ce_jobprevattempt") == traceparent(retry.context)
    assert header(replay_record, "traceparent") == traceparent(replayed.context)
    assert header(replay_record, "ce_jobprevattempt") == traceparent(retry.context)

    # Log lines carry the ids of the span they were written in.
    lines = [json.loads(line) for line in job_log.getvalue().splitlines()]
    job_lines = [line for line in lines if line["logger"] == "jobstream.job"]
    assert [(line["trace_id"], line["span_id"]) for line in job_lines] == [
        (f"{a.context.trace_id:032x}", f"{a.context.span_id:016x}") for a in (first, retry, again)
    ]
    [done] = [line for line in lines if line["logger"] == "jobstream.handler"]
    [last_work] = [s for s in work if is_child(s, again)]
    assert done["span_id"] == f"{last_work.context.span_id:016x}"


async def test_attempt_parent_none_starts_a_trace_per_attempt_linked_to_the_publish(
    new_topic, group_id, recorded
) -> None:
    provider, exporter = recorded
    topic = await routed_topic(new_topic)
    settings = settings_for(topic, group_id, attempt_parent="none")
    handler = Handler(provider, broken=False)
    app = handler.app()
    async with traced_worker(app, settings, provider):
        async with JobProducer(settings, tracer_provider=provider) as producer:
            with provider.get_tracer("test").start_as_current_span("POST /signup"):
                await producer.publish(TraceJob(n=2))
        await wait_until(lambda: handler.done == [2], 30, "the job")
    spans = list(exporter.get_finished_spans())
    [request] = named(spans, "POST /signup")
    [publish] = named(spans, f"send {topic}")
    [attempt] = named(spans, f"process {topic}")
    assert attempt.parent is None
    assert attempt.context.trace_id != request.context.trace_id
    assert links_of(attempt) == [ids(request, "origin"), ids(publish, "producer")]


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def assert_has(span: ReadableSpan, expected: dict[str, object]) -> None:
    found = dict(span.attributes or {})
    assert {name: found.get(name) for name in expected} == expected, span.name


def assert_failed(span: ReadableSpan, message: str) -> None:
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"RuntimeError: {message}"
    [event] = [event for event in span.events if event.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "RuntimeError"
    assert (event.attributes or {})["exception.message"] == message


async def until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.2)
