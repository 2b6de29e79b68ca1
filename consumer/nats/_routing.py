"""Failure routing on NATS JetStream: delayed redelivery, the dead-letter stream, replay.

- A retriable failure is handed back to JetStream with `nak(delay)`, the delay computed by
  the retry policy (never a bare `nak`: it redelivers at once and burns `max_deliver`).
  The nak is confirmed by the server before the job counts as settled; the next attempt is
  the next delivery (`attempt` = delivery count).
- A non-retriable failure, or the last attempt, is published to the dead-letter stream
  (`<routing.stream>_DLQ`, subject `<dead_letter_prefix><subject>`) with the original
  headers and body plus the failure details as `ce-job*` headers, the same names and
  values as the `ce_job*` headers on Kafka (`consumer.core._failures`). Only after JetStream
  stored it (PubAck) does the source `term` the original. The copy's `Nats-Msg-Id` is the
  original's stream position, so a crash between the two does not store it twice within
  the dead-letter stream's duplicate window.
"""

from __future__ import annotations

import logging

from opentelemetry.trace import Tracer

from consumer.core import (
    FAILURE_EXTENSIONS,
    REASON,
    Decision,
    JobRun,
    Outcome,
    Settings,
    failure_details,
    utc_now,
)
from consumer.nats._source import NatsSource
from consumer.runtime import until_acknowledged
from consumer.telemetry import handing_off, retrace
from producer.nats import NatsPublisher

log = logging.getLogger("jobstream.routing")


class NatsFailureRouter:
    def __init__(
        self,
        settings: Settings,
        publisher: NatsPublisher,
        source: NatsSource,
        tracer: Tracer | None = None,
    ) -> None:
        """`tracer`: record the dead-letter hand-off span (None when tracing is off)."""
        self._settings = settings
        self._publisher = publisher
        self._source = source
        self._tracer = tracer

    async def route(self, run: JobRun, error: Exception, decision: Decision) -> Outcome:
        delivery, attributes = run.delivery, run.attributes
        if decision.retry and attributes is not None:
            confirmed = await self._source.nak(delivery, decision.delay_s)
            log.info(
                "retry %d of %s in %.1fs%s",
                attributes.attempt + 1,
                attributes.id,
                decision.delay_s,
                "" if confirmed else " (nak unconfirmed: after the ack wait)",
            )
            return Outcome.RETRYING
        details = failure_details(run, error, decision, self._settings.worker.group, utc_now())
        jet = self._settings.jetstream
        subject = jet.dead_letter_subject(self._source.main_subject(delivery))
        headers = {
            name: value.decode()
            for name, value in delivery.raw_headers
            if name.lower() not in _REPLACED
        }
        attempt = attributes.attempt if attributes else delivery.delivery_count
        headers["ce-jobattempt"] = str(attempt)
        headers |= {f"ce-{name}": value for name, value in details.items()}
        headers["Nats-Msg-Id"] = f"dlq:{self._settings.routing.stream}:{delivery.offset}"
        if self._tracer is None:
            await until_acknowledged(
                lambda: self._publisher.send_raw(subject, headers, delivery.body)
            )
        else:
            # A retry is a `nak` of the same message (no new record to trace); the dead
            # letter is a new record: its own span, linked to the origin and the attempt.
            with handing_off(
                self._tracer, "nats", subject, attributes, details[REASON]
            ) as hand_off:
                pairs = retrace([(k, v.encode()) for k, v in headers.items()], hand_off, "ce-")
                traced = {name: value.decode() for name, value in pairs}
                await until_acknowledged(
                    lambda: self._publisher.send_raw(subject, traced, delivery.body)
                )
        log.warning("dead-lettered %s to %s: %s", delivery.describe, subject, decision.reason)
        return Outcome.DEAD_LETTERED


# Headers of the original that a dead letter replaces: earlier details, the attempt, the id.
_REPLACED = {f"ce-{name}" for name in (*FAILURE_EXTENSIONS, "jobattempt")} | {"nats-msg-id"}
