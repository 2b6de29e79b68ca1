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

Cost: the SDK spends about 8 us on each `Counter.add` with attributes, so the counters are
observable counters over plain per-worker tallies (read at collection time); only the
duration histogram is recorded per job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol, runtime_checkable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from consumer.core import JobRun, Next, Outcome, RetrySettings
from producer import tracecontext as otel

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


MAX_ERROR_TYPES = 64
"""Distinct `error.type` label values; later ones are counted as `other`."""
MAX_REASONS = 64
"""Distinct `jobstream.failure.reason` label values; later ones are counted as `other`."""


class _BoundedLabels:
    """Label values as they come, up to `limit` distinct ones, then `other`: every label
    set of the worker's metrics stays bounded whatever the jobs raise (SPEC G4)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def label(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(value)
        return value


class WorkerMetrics:
    """The instruments of one worker, and the pipeline step that feeds them."""

    def __init__(
        self,
        meter: Meter,
        *,
        system: str,
        group: str,
        retry: RetrySettings,
        job_types: Iterable[str] = (),
    ) -> None:
        """`job_types`: the types the app handles, the only `jobstream.job.type` values
        (any other, read from an untrusted `ce_type`, is counted as `unknown`)."""
        self._system = system
        self._job_types = frozenset(job_types)
        self._error_types = _BoundedLabels(MAX_ERROR_TYPES)
        self._reasons = _BoundedLabels(MAX_REASONS)
        self._group = group
        self._retry = retry
        self._started = self._counter(meter, "started", "Job attempts started")
        self._succeeded = self._counter(meter, "succeeded", "Attempts that completed")
        self._failed = self._counter(meter, "failed", "Attempts that failed")
        self._retried = self._counter(meter, "retried", "Jobs handed to a retry tier")
        self._dead = self._counter(meter, "dead_lettered", "Jobs dead-lettered")
        self._skipped = self._counter(meter, "skipped", "Duplicates and cancelled jobs")
        self._duration = meter.create_histogram(
            "messaging.process.duration",
            "s",
            "Duration of processing one job attempt",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._meter = meter
        self.backlog: list[Backlog] = []
        self._durations: dict[tuple[str, str, str, str | None], dict[str, str]] = {}

    @staticmethod
    def _counter(meter: Meter, name: str, description: str) -> Tally:
        tally = Tally()
        meter.create_observable_counter(
            f"jobstream.jobs.{name}", [tally.observe], "{job}", description
        )
        return tally

    def observe(self, in_flight: Callable[[], int]) -> None:
        """Register the gauges read at collection time."""
        self._meter.create_observable_gauge(
            "jobstream.worker.in_flight",
            [lambda _: [Observation(in_flight())]],
            "{job}",
            "Jobs admitted: running or waiting behind their ordering key",
        )
        self._meter.create_observable_gauge(
            "jobstream.consumer.lag",
            [self._lag],
            "{message}",
            "Messages per partition not yet settled by this worker",
        )
        self._meter.create_observable_gauge(
            "jobstream.retry.depth",
            [self._tier_depth],
            "{message}",
            "Messages waiting in each retry tier (of the partitions this worker holds)",
        )

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
        if job_type not in self._job_types:
            job_type = "unknown"  # label values come from a bounded set, never from a record
        self._started.add(((_JOB_TYPE, job_type),))
        started = time.perf_counter()
        outcome = await call_next(run)  # a cut-off run (CancelledError) is counted as started
        elapsed = time.perf_counter() - started
        error = run.error
        error_type = None
        if error is not None and outcome is not Outcome.COMPLETED:
            error_type = self._error_types.label(type(error).__name__)
            self._failed.add(((_JOB_TYPE, job_type), (_ERROR_TYPE, error_type)))
        self._duration.record(elapsed, self._duration_labels(run, job_type, outcome, error_type))
        if outcome is Outcome.COMPLETED:
            self._succeeded.add(((_JOB_TYPE, job_type),))
        elif outcome is Outcome.RETRYING:
            self._retried.add(((_JOB_TYPE, job_type),))
        elif outcome is Outcome.DEAD_LETTERED:
            reason = self._reasons.label(run.failure_reason or "unknown")
            self._dead.add(((_JOB_TYPE, job_type), ("jobstream.failure.reason", reason)))
        elif outcome in (Outcome.DUPLICATE, Outcome.CANCELLED):
            self._skipped.add(((_JOB_TYPE, job_type), ("jobstream.job.outcome", outcome.value)))
        return outcome

    def _duration_labels(
        self, run: JobRun, job_type: str, outcome: Outcome, error_type: str | None
    ) -> dict[str, str]:
        key = (run.delivery.topic, job_type, outcome.value, error_type)
        labels = self._durations.get(key)
        if labels is None:
            labels = {
                otel.SYSTEM: self._system,
                otel.OPERATION_NAME: "process",
                otel.DESTINATION: run.delivery.topic,
                otel.CONSUMER_GROUP: self._group,
                _JOB_TYPE: job_type,
                "jobstream.job.outcome": outcome.value,
            }
            if error_type is not None:
                labels[_ERROR_TYPE] = error_type
            self._durations[key] = labels
        return labels

    def _lag(self, _: CallbackOptions) -> Iterable[Observation]:
        for entry in self.backlog:
            labels = {
                otel.SYSTEM: self._system,
                otel.DESTINATION: entry.destination,
                otel.PARTITION: entry.partition,
                otel.CONSUMER_GROUP: self._group,
            }
            yield Observation(entry.messages, labels)

    def _tier_depth(self, _: CallbackOptions) -> Iterable[Observation]:
        depth: dict[str, int] = {}
        for entry in self.backlog:
            if self._retry.main_topic(entry.destination) != entry.destination:
                depth[entry.destination] = depth.get(entry.destination, 0) + entry.messages
        for topic, messages in sorted(depth.items()):
            yield Observation(messages, {otel.SYSTEM: self._system, otel.DESTINATION: topic})


class Tally:
    """Cumulative counts by attribute set, observed by an observable counter."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[tuple[str, str], ...], int] = {}

    def add(self, labels: tuple[tuple[str, str], ...]) -> None:
        self.counts[labels] = self.counts.get(labels, 0) + 1

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, dict(labels)) for labels, count in list(self.counts.items())]
