"""Failure routing to records: retry tier topics and the dead-letter topic.

Written once for every backend whose retries are records in topics (Kafka, and the memory
backend that mimics it); it needs only a `RecordPublisher`. NATS hands a retry back to
JetStream instead (`consumer.nats`).

A retriable failure is republished to the retry tier that fits its delay, with the attempt
count, the due time (`jobnotbefore`) and the failure details in headers; the worker's own
source reads the tier topics and holds each record back until it is due. A non-retriable
failure, or the last attempt, goes to the dead-letter topic of the job's main topic with
the original key, body and headers plus the failure details. A priority level's topic
(`<topic>.priority-high`) shares its normal topic's tiers and dead-letter topic: a
retry runs at the normal level.

`route` returns only once the broker acknowledged the record, so the source offset is
committed after the hand-off, never before (G2). The hand-off is bounded
(`consumer.runtime._hand_off`): a broker outage is retried with backoff for up to
`retry.hand_off_timeout_s`, then the worker stops (the job unsettled: redelivered). A
retry record that cannot be built (e.g. headers over `schemas.MAX_HEADER_BYTES`:
`retry-record-invalid`) or that the broker refuses for good (`retry-record-refused`)
dead-letters the job instead; a dead letter refused for good is stored reduced.

A retry record is the job re-encoded (`to_kafka`) plus the original record's foreign
headers (`x-tenant`, ...: everything that is not `ce_*`, `content-type` or trace
context), so what a job carries survives its retries and its dead letter. A dead letter
is the original record's headers as received (a null value stored as empty) plus the
failure details.

With tracing on, each hand-off is a PRODUCER span (`consumer/telemetry/_tracing.py`): the new
record's `traceparent` is that span, `jobprevattempt` names the failed attempt, and the
origin (`joborigin`) is carried over unchanged (pinned to the first `traceparent` for jobs
whose producer set none).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from opentelemetry.trace import Tracer

from consumer.core import (
    ERROR,
    REASON,
    SOURCE_TOPIC,
    Decision,
    JobRun,
    Outcome,
    Settings,
    cut_text,
    error_text,
    failure_details,
    utc_now,
)
from consumer.runtime._hand_off import store_dead_letter, until_acknowledged
from consumer.telemetry import HandOff, handing_off, retrace
from producer import PublishError, Receipt, destination_level
from producer.tracecontext import traceparent_of
from schemas import InvalidAttributes, JobAttributes, JobMessage, foreign_headers, to_kafka
from schemas.names import JOBATTEMPT, KAFKA_PREFIX, PREVIOUS_ATTEMPT, REDUCTION_EXTENSIONS

_ATTEMPT = f"{KAFKA_PREFIX}{JOBATTEMPT}"
log = logging.getLogger("jobstream.routing")


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
        # A priority level's topic shares its normal topic's tiers and dead-letter topic.
        main_topic = destination_level(self._retry.main_topic(details[SOURCE_TOPIC]))[0]
        if decision.retry and run.attributes is not None:
            try:
                return await self._retry_record(run, decision, details, now, main_topic)
            except (InvalidAttributes, ValueError, OverflowError) as invalid:
                # E.g. headers over the size limit: the job cannot travel as a retry record.
                details = redirected(details, "retry-record-invalid", invalid)
            except PublishError as refused:  # permanent (transient ones are retried)
                details = redirected(details, "retry-record-refused", refused)
        topic = self._retry.dead_letter_topic(main_topic)
        attributes = run.attributes
        with self._handing_off(topic, attributes, details[REASON]) as hand_off:
            attempt = attributes.attempt if attributes is not None else None
            headers = dead_letter_headers(run.delivery.raw_headers, details, attempt)
            if hand_off is not None and attributes is not None:
                headers = retrace(headers, hand_off)

            async def publish(headers: list[tuple[str, bytes]], value: bytes) -> Receipt:
                key = run.delivery.raw_key
                return await self._publisher.send_record(topic, key, headers, value)

            _, form = await store_dead_letter(
                publish,
                headers,
                run.delivery.body,
                run.delivery.raw_headers,
                prefix=KAFKA_PREFIX,
                timeout_s=self._retry.hand_off_timeout_s,
                what=run.delivery.describe,
            )
        log.warning(
            "dead-lettered %s to %s: %s%s",
            run.delivery.describe,
            topic,
            details[REASON],
            "" if form == "whole" else f" (stored reduced: {form} replaced)",
        )
        return Outcome.DEAD_LETTERED

    async def _retry_record(
        self,
        run: JobRun,
        decision: Decision,
        details: dict[str, str],
        now: datetime,
        main_topic: str,
    ) -> Outcome:
        attributes = run.attributes
        assert attributes is not None
        retried = attributes.replace(
            attempt=attributes.attempt + 1,
            not_before=now + timedelta(seconds=decision.delay_s),
        ).with_extensions(**details)
        topic = self._retry.tier_for(main_topic, decision.delay_s)
        with self._handing_off(topic, attributes, decision.reason) as hand_off:
            if hand_off is not None:
                retried = _traced(retried, hand_off)
                hand_off.describe({"jobstream.retry.delay_s": round(decision.delay_s, 3)})
            key, headers = to_kafka(retried)
            headers += _present(foreign_headers(run.delivery.raw_headers))
            await until_acknowledged(
                lambda: self._publisher.send_record(topic, key, headers, run.delivery.body),
                self._retry.hand_off_timeout_s,
                run.delivery.describe,
            )
        log.info(
            "retry %d of %s in %.1fs via %s", retried.attempt, retried.id, decision.delay_s, topic
        )
        return Outcome.RETRYING

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
    original: Sequence[tuple[str, bytes | None]],
    details: dict[str, str],
    attempt: int | None = None,
) -> list[tuple[str, bytes]]:
    """The original headers, with earlier failure details replaced by `details` (a null
    header value, which Kafka allows, is stored as an empty one), and `ce_jobattempt` set to
    `attempt` where it is given: the attempt that failed last, later than the record's own
    after in-place retries."""
    replaced = {f"{KAFKA_PREFIX}{name}" for name in (*details, *REDUCTION_EXTENSIONS)}
    kept = [(name, value) for name, value in _present(original) if name.lower() not in replaced]
    if attempt is not None:
        current = str(attempt).encode()
        kept = [(name, current if name.lower() == _ATTEMPT else value) for name, value in kept]
    return kept + [(f"{KAFKA_PREFIX}{name}", value.encode()) for name, value in details.items()]


def redirected(details: dict[str, str], reason: str, cause: Exception) -> dict[str, str]:
    """`details` of a job that was to be retried but is dead-lettered (`reason`), the
    cause appended to its error (cut by bytes, like the error itself)."""
    error = f"{details[ERROR]} (and no retry record: {error_text(cause)})"
    return details | {REASON: reason, ERROR: cut_text(error)}


def _present(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    return [(name, b"" if value is None else value) for name, value in headers]
