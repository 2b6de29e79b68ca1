"""Failure routing to records: retry tier topics and the dead-letter topic.

Written once for every backend whose retries are records in topics (Kafka, and the memory
backend that mimics it); it needs only a `RecordPublisher`. NATS hands a retry back to
JetStream instead (`consumer.nats`).

A retriable failure is republished to the retry tier that fits its delay, with the attempt
count, the due time (`jobnotbefore`) and the failure details in headers; the worker's own
source reads the tier topics and holds each record back until it is due. A non-retriable
failure, or the last attempt, goes to the dead-letter topic of the job's main topic with
the original key, body and headers plus the failure details.

`route` returns only once the broker acknowledged the record, so the source offset is
committed after the hand-off, never before (G2). A broker outage is retried with backoff
until it ends or the worker stops (then the job is simply not settled: redelivered).

With tracing on, each hand-off is a PRODUCER span (`consumer/telemetry/_tracing.py`): the new
record's `traceparent` is that span, `jobprevattempt` names the failed attempt, and the
origin (`joborigin`) is carried over unchanged (pinned to the first `traceparent` for jobs
whose producer set none).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Protocol, TypeVar

from opentelemetry.trace import Tracer

from consumer.core import (
    ERROR,
    REASON,
    Decision,
    JobRun,
    Outcome,
    Settings,
    failure_details,
    utc_now,
)
from consumer.telemetry import HandOff, handing_off, retrace
from producer import PublishError, Receipt
from producer.retrying import Backoff, retry
from producer.tracecontext import traceparent_of
from schemas import InvalidAttributes, JobAttributes, JobMessage
from schemas.names import PREVIOUS_ATTEMPT

log = logging.getLogger("jobstream.routing")
T = TypeVar("T")
_HAND_OFF_BACKOFF = Backoff(initial_s=0.2, max_s=10.0, jitter=True)


class RecordPublisher(Protocol):
    """What the router needs of a publisher (`KafkaPublisher`, `MemoryPublisher`)."""

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        """Publish an encoded job; return once the broker acknowledged it."""
        ...

    async def send_record(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> Receipt:
        """Publish a record as it is (a dead letter); return once acknowledged."""
        ...


class RecordFailureRouter:
    """Routes failed jobs to retry tier topics and the dead-letter topic as records."""

    def __init__(
        self,
        settings: Settings,
        publisher: RecordPublisher,
        tracer: Tracer | None = None,
        *,
        system: str = "kafka",
    ) -> None:
        """`tracer`: record hand-off spans (None when tracing is off); `system`: the
        `messaging.system` those spans name."""
        self._system = system
        self._settings = settings
        self._retry = settings.retry
        self._publisher = publisher
        self._tracer = tracer

    async def route(self, run: JobRun, error: Exception, decision: Decision) -> Outcome:
        now = utc_now()
        details = failure_details(run, error, decision, self._settings.worker.group, now)
        main_topic = self._retry.main_topic(details["jobsrctopic"])
        attributes = run.attributes
        retried = None
        if decision.retry and attributes is not None:
            try:
                retried = attributes.replace(
                    attempt=attributes.attempt + 1,
                    not_before=now + timedelta(seconds=decision.delay_s),
                ).with_extensions(**details)
            except InvalidAttributes as invalid:
                # E.g. headers over the size limit: the job cannot travel as a retry record.
                details[REASON] = "retry-record-invalid"
                details[ERROR] = f"{details[ERROR]} (and no retry record: {invalid})"
        if retried is not None:
            topic = self._retry.tier_for(main_topic, decision.delay_s)
            with self._handing_off(topic, attributes, decision.reason) as hand_off:
                if hand_off is not None:
                    retried = _traced(retried, hand_off)
                    hand_off.describe({"jobstream.retry.delay_s": round(decision.delay_s, 3)})
                record = JobMessage(retried, run.delivery.body)
                await until_acknowledged(lambda: self._publisher.send(topic, record))
            log.info(
                "retry %d of %s in %.1fs via %s",
                retried.attempt,
                retried.id,
                decision.delay_s,
                topic,
            )
            return Outcome.RETRYING
        topic = self._retry.dead_letter_topic(main_topic)
        with self._handing_off(topic, attributes, details[REASON]) as hand_off:
            headers = dead_letter_headers(run.delivery.raw_headers, details)
            if hand_off is not None and attributes is not None:
                headers = retrace(headers, hand_off)
            await until_acknowledged(
                lambda: self._publisher.send_record(
                    topic, run.delivery.raw_key, headers, run.delivery.body
                )
            )
        log.warning("dead-lettered %s to %s: %s", run.delivery.describe, topic, decision.reason)
        return Outcome.DEAD_LETTERED

    @contextlib.contextmanager
    def _handing_off(
        self, topic: str, attributes: JobAttributes | None, reason: str
    ) -> Iterator[HandOff | None]:
        if self._tracer is None:
            yield None
            return
        with handing_off(self._tracer, self._system, topic, attributes, reason) as hand_off:
            yield hand_off


def _traced(retried: JobAttributes, hand_off: HandOff) -> JobAttributes:
    """The retry record with the hand-off's trace context and the origin pinned: the one it
    had, else its first `traceparent`, else (a job that came without any trace context)
    the attempt that failed."""
    trace = hand_off.trace_headers()
    origin, origin_state = retried.origin_traceparent, retried.origin_tracestate
    if origin is None:
        origin, origin_state = retried.traceparent, retried.tracestate
    if origin is None:
        origin, origin_state = traceparent_of(hand_off.attempt)
    try:
        changed = retried.replace(
            traceparent=trace["traceparent"],
            tracestate=trace["tracestate"],
            origin_traceparent=origin,
            origin_tracestate=origin_state,
        )
        previous = trace.get(PREVIOUS_ATTEMPT)
        return changed.with_extensions(jobprevattempt=previous) if previous else changed
    except InvalidAttributes:  # at the header size limit: travel without the new context
        log.debug("retry record of %s keeps its trace context", retried.id)
        return retried


def dead_letter_headers(
    original: list[tuple[str, bytes]], details: dict[str, str]
) -> list[tuple[str, bytes]]:
    """The original headers, with earlier failure details replaced by `details`."""
    replaced = {f"ce_{name}" for name in details}
    kept = [(name, value) for name, value in original if name.lower() not in replaced]
    return kept + [(f"ce_{name}", value.encode()) for name, value in details.items()]


async def until_acknowledged(publish: Callable[[], Awaitable[Receipt]]) -> Receipt:
    """Publish until the broker acknowledges, with backoff (logged): a failed job's hand-off
    is never dropped; while it waits the job stays unsettled (G1, G2)."""
    return await retry(publish, on=PublishError, backoff=_HAND_OFF_BACKOFF, on_retry=_not_handed_on)


def _not_handed_on(error: Exception, wait_s: float) -> None:
    log.error("could not hand a failed job on (%s); retrying in %.1fs", error, wait_s)
