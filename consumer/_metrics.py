"""Worker metrics through the OpenTelemetry metrics API (docs/observability.md).

| instrument | kind, unit | attributes |
|---|---|---|
| `jobstream.jobs.started` | counter, `{job}` | `jobstream.job.type` |
| `jobstream.jobs.succeeded` | counter | `jobstream.job.type` |
| `jobstream.jobs.failed` | counter: attempts that failed | `jobstream.job.type`, `error.type` |
| `jobstream.jobs.retried` | counter: handed to a retry tier | `jobstream.job.type` |
| `jobstream.jobs.dead_lettered` | counter | `jobstream.job.type`, `jobstream.failure.reason` |
| `jobstream.jobs.skipped` | counter: duplicates, cancelled | job type, `jobstream.job.outcome` |
| `messaging.process.duration` | histogram, `s` | destination, group, job type, outcome |
| `jobstream.worker.in_flight` | gauge, `{job}` | - |
| `jobstream.consumer.lag` | gauge, `{message}` | destination, partition, group |
| `jobstream.retry.depth` | gauge, `{message}` | the tier topic |

A job run counts once per attempt: a job that fails once and then succeeds adds 2 to
`started`, 1 to `failed`, 1 to `retried` and 1 to `succeeded`. A run cut off by shutdown
counts as started only. Lag and tier depth come from the source (`ReportsBacklog`), read
every `BACKLOG_REFRESH_S` by the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol, runtime_checkable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from consumer._outcome import Outcome
from consumer._pipeline import JobRun, Next
from consumer._settings import RetrySettings
from producer import _tracecontext as otel

BACKLOG_REFRESH_S = 2.0
_JOB_TYPE = otel.JOB_TYPE
_ERROR_TYPE = "error.type"
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 30.0, 60.0, 300.0)  # fmt: skip


class Backlog(NamedTuple):
    """Messages waiting in one partition (Kafka) or consumer (NATS), not yet settled here."""

    destination: str
    """The topic (Kafka) or stream subject / consumer (NATS)."""
    partition: str
    """The partition number (Kafka), or the consumer name (NATS)."""
    messages: int


@runtime_checkable
class ReportsBacklog(Protocol):
    """A source that can say how much waits for it. Kafka: per assigned partition, its end
    (highwater) minus what this worker has settled. NATS: per consumer, the pending count
    (the stream's `num_pending`, e.g. from the last message's metadata)."""

    async def backlog(self) -> list[Backlog]: ...


class WorkerMetrics:
    """The instruments of one worker, and the pipeline step that feeds them."""

    def __init__(self, meter: Meter, *, system: str, group: str, retry: RetrySettings) -> None:
        self._system = system
        self._group = group
        self._retry = retry
        counter = meter.create_counter
        self._started = counter("jobstream.jobs.started", "{job}", "Job attempts started")
        self._succeeded = counter("jobstream.jobs.succeeded", "{job}", "Attempts that completed")
        self._failed = counter("jobstream.jobs.failed", "{job}", "Attempts that failed")
        self._retried = counter("jobstream.jobs.retried", "{job}", "Jobs handed to a retry tier")
        self._dead = counter("jobstream.jobs.dead_lettered", "{job}", "Jobs dead-lettered")
        self._skipped = counter("jobstream.jobs.skipped", "{job}", "Duplicates and cancelled jobs")
        self._duration = meter.create_histogram(
            "messaging.process.duration", "s", "Duration of processing one job attempt",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        self._meter = meter
        self.backlog: list[Backlog] = []
        self._by_type: dict[str, dict[str, str]] = {}

    def observe(self, in_flight: Callable[[], int]) -> None:
        """Register the gauges read at collection time."""
        self._meter.create_observable_gauge(
            "jobstream.worker.in_flight", [lambda _: [Observation(in_flight())]], "{job}",
            "Jobs admitted: running or waiting behind their ordering key",
        )  # fmt: skip
        self._meter.create_observable_gauge(
            "jobstream.consumer.lag", [self._lag], "{message}",
            "Messages per partition not yet settled by this worker",
        )  # fmt: skip
        self._meter.create_observable_gauge(
            "jobstream.retry.depth", [self._tier_depth], "{message}",
            "Messages waiting in each retry tier (of the partitions this worker holds)",
        )  # fmt: skip

    async def refresh(self, source: ReportsBacklog, stopping: asyncio.Event) -> None:
        """Read the source's backlog every `BACKLOG_REFRESH_S` until `stopping` is set."""
        while not stopping.is_set():
            try:
                async with asyncio.timeout(BACKLOG_REFRESH_S):
                    self.backlog = await source.backlog()
            except Exception:  # noqa: BLE001 - a metric must never hurt the worker
                self.backlog = []
            try:
                async with asyncio.timeout(BACKLOG_REFRESH_S):
                    await stopping.wait()
            except TimeoutError:
                pass

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        attributes = run.attributes
        job_type = attributes.type if attributes is not None else "unknown"
        labels = self._by_type.get(job_type)
        if labels is None:
            labels = self._by_type[job_type] = {_JOB_TYPE: job_type}
        self._started.add(1, labels)
        started = time.perf_counter()
        outcome = await call_next(run)  # a cut-off run (CancelledError) is counted as started
        elapsed = time.perf_counter() - started
        error = run.error
        duration = {
            otel.SYSTEM: self._system, otel.OPERATION_NAME: "process",
            otel.DESTINATION: run.delivery.topic, otel.CONSUMER_GROUP: self._group,
            _JOB_TYPE: job_type, "jobstream.job.outcome": outcome.value,
        }  # fmt: skip
        if error is not None and outcome is not Outcome.COMPLETED:
            self._failed.add(1, {**labels, _ERROR_TYPE: type(error).__name__})
            duration[_ERROR_TYPE] = type(error).__name__
        self._duration.record(elapsed, duration)
        if outcome is Outcome.COMPLETED:
            self._succeeded.add(1, labels)
        elif outcome is Outcome.RETRYING:
            self._retried.add(1, labels)
        elif outcome is Outcome.DEAD_LETTERED:
            reason = run.failure_reason or "unknown"
            self._dead.add(1, {**labels, "jobstream.failure.reason": reason})
        elif outcome in (Outcome.DUPLICATE, Outcome.CANCELLED):
            self._skipped.add(1, {**labels, "jobstream.job.outcome": outcome.value})
        return outcome

    def _lag(self, _: CallbackOptions) -> Iterable[Observation]:
        for entry in self.backlog:
            yield Observation(entry.messages, {
                otel.SYSTEM: self._system, otel.DESTINATION: entry.destination,
                otel.PARTITION: entry.partition, otel.CONSUMER_GROUP: self._group,
            })  # fmt: skip

    def _tier_depth(self, _: CallbackOptions) -> Iterable[Observation]:
        depth: dict[str, int] = {}
        for entry in self.backlog:
            if self._retry.main_topic(entry.destination) != entry.destination:
                depth[entry.destination] = depth.get(entry.destination, 0) + entry.messages
        for topic, messages in sorted(depth.items()):
            yield Observation(messages, {otel.SYSTEM: self._system, otel.DESTINATION: topic})
