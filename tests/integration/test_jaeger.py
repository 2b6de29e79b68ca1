"""G7 end to end in a real Jaeger (started by `make up`, built from source, on 127.0.0.1).

A worker process exports over OTLP/HTTP as the OTEL_* variables say; this test publishes
from inside a request span (exported to the same Jaeger), the first attempt fails, the
retry succeeds, and Jaeger's query API must show one trace holding the request, the
publish, both processing attempts and the hand-off to the retry tier, with the retry
attempt's span linked (a FOLLOWS_FROM reference) to the origin and to the first attempt.
Traces arrive asynchronously: the query is polled until a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from consumer import Settings
from producer import JobProducer
from tests.apps.recorder import RecordJob
from tests.conftest import KAFKA_BOOTSTRAP
from tests.support import read_sink, start_ready_workers, stop_worker, wait_until, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JAEGER = os.environ.get("JOBSTREAM_TEST_JAEGER", "http://127.0.0.1:16686")
OTLP = os.environ.get("JOBSTREAM_TEST_OTLP", "http://127.0.0.1:4318")
TRACE_DEADLINE_S = 30.0


def jaeger_get(path: str) -> Any:
    with urllib.request.urlopen(f"{JAEGER}{path}", timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def jaeger() -> str:
    try:
        jaeger_get("/api/services")
    except OSError as error:
        pytest.fail(f"Jaeger is not reachable at {JAEGER} ({error!r}): run `make up`")
    return JAEGER


async def find_trace(trace_id: str, complete: Any) -> dict[str, Any]:
    """Poll Jaeger for the trace until `complete(trace)` holds (spans arrive in batches
    from two processes), or fail at the deadline showing what arrived."""
    deadline = time.monotonic() + TRACE_DEADLINE_S
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            data = jaeger_get(f"/api/traces/{trace_id}").get("data") or []
        except urllib.error.HTTPError as error:
            if error.code != 404:  # not stored yet
                raise
            data = []
        if data:
            found = data[0]
            if complete(found):
                return found
        await asyncio.sleep(0.5)
    names = sorted(span["operationName"] for span in found.get("spans", []))
    raise AssertionError(f"trace {trace_id} incomplete after {TRACE_DEADLINE_S}s: {names}")


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def references(span: dict[str, Any], kind: str) -> set[str]:
    return {ref["spanID"] for ref in span.get("references", []) if ref["refType"] == kind}


async def test_retried_job_is_one_trace_in_jaeger_linked_to_its_origin(
    jaeger, new_topic, group_id, tmp_path
) -> None:
    topic = await new_topic(partitions=2)
    for suffix in (".retry.1", ".retry.2", ".dlq"):
        await new_topic(partitions=2, name=topic + suffix)
    run = uuid.uuid4().hex[:8]
    worker_service, request_service = f"jobstream-worker-{run}", f"signup-{run}"
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        OTEL_SERVICE_NAME=worker_service,
        OTEL_EXPORTER_OTLP_ENDPOINT=OTLP,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRICS_EXPORTER="prometheus",
        JOBSTREAM_RETRY__TIERS_S="[0.5, 2.0]",
        JOBSTREAM_RETRY__POLICY__INITIAL_DELAY_S="0.5",
        JOBSTREAM_RETRY__POLICY__JITTER="0",
    )
    [worker] = await start_ready_workers(env, tmp_path, 1)

    provider = TracerProvider(resource=Resource.create({"service.name": request_service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{OTLP}/v1/traces")))
    settings = Settings(
        kafka={"bootstrap_servers": KAFKA_BOOTSTRAP}, routing={"routes": {"test.record": topic}}
    )
    try:
        async with JobProducer(settings, tracer_provider=provider) as producer:
            tracer = provider.get_tracer("tests.signup")
            with tracer.start_as_current_span("POST /signup", kind=SpanKind.SERVER) as request:
                receipt = await producer.publish(
                    RecordJob(seq=1, key="user-1", behaviour="fail-once"), key="user-1"
                )
        assert await asyncio.to_thread(provider.force_flush)
        await wait_until(lambda: bool(read_sink(sink)), 30, "the retry to succeed")
    finally:
        assert stop_worker(worker) == 0
        provider.shutdown()

    trace_id = f"{request.get_span_context().trace_id:032x}"
    request_id = f"{request.get_span_context().span_id:016x}"
    wanted = {
        "POST /signup",
        f"send {topic}",
        f"process {topic}",
        f"send {topic}.retry.1",
        f"process {topic}.retry.1",
    }

    def complete(found: dict[str, Any]) -> bool:
        return wanted <= {span["operationName"] for span in found["spans"]}

    found = await find_trace(trace_id, complete)
    spans = {span["operationName"]: span for span in found["spans"]}
    services = {key: process["serviceName"] for key, process in found["processes"].items()}

    def service(name: str) -> str:
        return services[spans[name]["processID"]]

    assert service("POST /signup") == service(f"send {topic}") == request_service
    assert service(f"process {topic}") == service(f"process {topic}.retry.1") == worker_service
    publish, first = spans[f"send {topic}"], spans[f"process {topic}"]
    hand_off, retry = spans[f"send {topic}.retry.1"], spans[f"process {topic}.retry.1"]
    # Parents (CHILD_OF): request -> publish -> attempt 1 -> hand-off -> attempt 2.
    assert references(publish, "CHILD_OF") == {request_id}
    assert references(first, "CHILD_OF") == {publish["spanID"]}
    assert references(hand_off, "CHILD_OF") == {first["spanID"]}
    assert references(retry, "CHILD_OF") == {hand_off["spanID"]}
    # Links (FOLLOWS_FROM): each attempt to the origin, the retry also to attempt 1.
    assert references(first, "FOLLOWS_FROM") == {request_id}
    assert references(retry, "FOLLOWS_FROM") == {request_id, first["spanID"]}
    assert tags(publish)["span.kind"] == "producer"
    assert tags(retry)["span.kind"] == "consumer"
    assert tags(first)["otel.status_code"] == "ERROR"
    assert tags(retry) | {"jobstream.job.attempt": 2} == tags(retry)
    assert {
        key: tags(retry)[key]
        for key in (
            "messaging.system",
            "messaging.destination.name",
            "jobstream.job.id",
            "jobstream.job.outcome",
            "messaging.consumer.group.name",
        )
    } == {
        "messaging.system": "kafka",
        "messaging.destination.name": f"{topic}.retry.1",
        "jobstream.job.id": receipt.job_id,
        "jobstream.job.outcome": "completed",
        "messaging.consumer.group.name": group_id,
    }
