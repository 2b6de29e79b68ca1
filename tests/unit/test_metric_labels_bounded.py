"""Issue 13, K7: metric label sets stay bounded whatever the records say. `ce_type` is
untrusted: 5,000 junk types must not make 5,000 label sets (the job type label is one of
the app's types or `unknown`); nor may 5,000 exception classes."""

from __future__ import annotations

from datetime import UTC, datetime

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from consumer.core import Delivery, JobRun, Outcome, RetrySettings
from consumer.telemetry import WorkerMetrics
from consumer.telemetry._metrics import MAX_ERROR_TYPES
from schemas import JobAttributes


def run_of(job_type: str, offset: int) -> JobRun:
    attributes = JobAttributes(
        id=f"job-{offset}", type=job_type, source="/t", time=datetime.now(UTC)
    )
    delivery = Delivery(0, offset, "jobs", attributes, b"{}")
    return JobRun(delivery, None, None, None)


def label_sets(reader: InMemoryMetricReader, name: str) -> list[dict[str, object]]:
    data = reader.get_metrics_data()
    assert data is not None
    found = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [dict(point.attributes or {}) for point in metric.data.data_points]
    return found


async def test_junk_job_types_and_error_classes_make_a_bounded_number_of_label_sets() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    metrics = WorkerMetrics(
        meter, system="kafka", group="g", retry=RetrySettings(), job_types=["email.welcome"]
    )

    async def fail(run: JobRun) -> Outcome:
        run.error = type(f"Error{run.delivery.offset}", (Exception,), {})("boom")
        run.failure_reason = f"reason-{run.delivery.offset}"
        return Outcome.DEAD_LETTERED

    async def complete(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    for n in range(5000):
        await metrics(run_of(f"junk.{n}", n), fail)
    for n in range(10):
        await metrics(run_of("email.welcome", 10_000 + n), complete)

    started = label_sets(reader, "jobstream.jobs.started")
    assert sorted(str(s["jobstream.job.type"]) for s in started) == ["email.welcome", "unknown"]
    failed = label_sets(reader, "jobstream.jobs.failed")
    assert len(failed) == MAX_ERROR_TYPES + 1  # 64 error classes, then `other`
    assert {"unknown"} == {s["jobstream.job.type"] for s in failed}
    dead = label_sets(reader, "jobstream.jobs.dead_lettered")
    assert len(dead) <= 65
    durations = label_sets(reader, "messaging.process.duration")
    assert len(durations) <= MAX_ERROR_TYPES + 2
