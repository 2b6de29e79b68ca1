"""Failure routing on NATS JetStream: delayed redelivery, the dead-letter stream, replay.

- A retriable failure is handed back to JetStream with `nak(delay)`, the delay computed by
  the retry policy (never a bare `nak`: it redelivers at once and burns `max_deliver`).
  Before the first such nak the time of the failure is recorded in the first-failure KV
  bucket (`_first_failures`): the redelivery reads it back, and the retry budget counts
  from it.
  The nak is confirmed by the server before the job counts as settled; the next attempt is
  the next delivery (`attempt` = delivery count). The message is the same, so its headers
  (`x-tenant`, ...) travel with every attempt.
- A non-retriable failure, or the last attempt, is published to the dead-letter stream
  (`<routing.stream>_DLQ`, subject `<dead_letter_prefix><subject>`) with the original
  headers and body plus the failure details as `ce-job*` headers, the same names and
  values as the `ce_job*` headers on Kafka (`consumer.core._failures`). Only after JetStream
  stored it (PubAck) does the source `term` the original. The hand-off is bounded and a
  dead letter refused for good is stored reduced (`consumer.runtime._hand_off`).
- A message on its last delivery (`max_deliver`, reached only by redeliveries that were
  not failures: crashes, cut-offs) is dead-lettered without running, reason
  `max-deliveries` (`dead_letter_last_delivery`, called by the source).
- The copy's `Nats-Msg-Id` is `dlq:<stream>:<sequence>:<stored time>`: the original's
  stream position and the time JetStream stored it, so a crash between publish and `term`
  does not store it twice within the dead-letter stream's duplicate window, while a new
  message at the same sequence (the job stream re-created) gets a new id. A PubAck that
  says `duplicate` is not taken on trust: the message it points at must be this dead
  letter (same id, job id and body); otherwise nothing was stored and the dead letter is
  published again under a fresh id (`<id>:<random>`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import nats.errors
from opentelemetry.trace import Tracer

from consumer.core import (
    FAILURE_EXTENSIONS,
    FIRST_FAILURE,
    REASON,
    Decision,
    Delivery,
    JobRun,
    MaxDeliveries,
    Outcome,
    Settings,
    failure_details,
    first_failure_stamp,
    utc_now,
)
from consumer.nats._source import NatsSource
from consumer.runtime import store_dead_letter
from consumer.telemetry import HandOff, handing_off, retrace
from producer import BrokerUnavailable, Receipt
from producer.nats import NatsPublisher
from schemas.names import NATS_MSG_ID, NATS_PREFIX, REDUCTION_EXTENSIONS

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
            if FIRST_FAILURE not in attributes.extensions:
                stamp = first_failure_stamp(run, utc_now())
                await self._source.remember_first_failure(delivery, stamp)
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
        subject = self._settings.jetstream.dead_letter_subject(self._source.main_subject(delivery))
        headers = [
            (name, value or b"")
            for name, value in delivery.raw_headers
            if name.lower() not in _REPLACED
        ]
        attempt = attributes.attempt if attributes else delivery.delivery_count
        headers.append((f"{NATS_PREFIX}jobattempt", str(attempt).encode()))
        headers += [(f"{NATS_PREFIX}{name}", value.encode()) for name, value in details.items()]
        headers.append((NATS_MSG_ID, _message_id(self._settings.routing.stream, delivery).encode()))
        with self._handing_off(subject, run, details[REASON]) as hand_off:
            if hand_off is not None:
                # A retry is a `nak` of the same message (no new record to trace); the dead
                # letter is a new record: its own span, linked to the origin and the attempt.
                headers = retrace(headers, hand_off, NATS_PREFIX)

            async def publish(pairs: list[tuple[str, bytes]], body: bytes) -> Receipt:
                return await self._publish(subject, pairs, body)

            _, form = await store_dead_letter(
                publish,
                headers,
                delivery.body,
                delivery.raw_headers,
                prefix=NATS_PREFIX,
                timeout_s=self._settings.retry.hand_off_timeout_s,
                what=delivery.describe,
            )
        log.warning(
            "dead-lettered %s to %s: %s%s",
            delivery.describe,
            subject,
            details[REASON],
            "" if form == "whole" else f" (stored reduced: {form} replaced)",
        )
        return Outcome.DEAD_LETTERED

    async def dead_letter_last_delivery(self, delivery: Delivery) -> Outcome:
        """Dead-letter a message on its last delivery (`max_deliver`) without running it:
        JetStream would not deliver it again, and it would stay unacknowledged for ever."""
        error = MaxDeliveries(delivery.delivery_count)
        decision = Decision(retry=False, delay_s=0.0, reason=error.reason)
        return await self.route(JobRun(delivery, None, None, None), error, decision)

    async def _publish(self, subject: str, pairs: list[tuple[str, bytes]], body: bytes) -> Receipt:
        headers = {name: value.decode("utf-8", "ignore") for name, value in pairs}
        receipt = await self._publisher.send_raw(subject, headers, body)
        if receipt.duplicate and not await self._stored(receipt, headers, body):
            # JetStream dropped it as a repeat of another message: nothing was stored.
            log.warning(
                "the dead-letter stream took %s as a duplicate of another message; "
                "publishing it again under a new id",
                headers.get(NATS_MSG_ID),
            )
            headers[NATS_MSG_ID] = f"{headers.get(NATS_MSG_ID)}:{uuid.uuid4().hex}"
            receipt = await self._publisher.send_raw(subject, headers, body)
        return receipt

    async def _stored(self, receipt: Receipt, headers: dict[str, str], body: bytes) -> bool:
        """Whether the message a duplicate PubAck points at is this dead letter."""
        js = self._publisher.client.jetstream()
        try:
            stored = await js.get_msg(receipt.destination, receipt.offset)
        except nats.errors.Error as error:
            if isinstance(error, nats.errors.TimeoutError | nats.errors.ConnectionClosedError):
                servers = ", ".join(self._settings.nats.servers)
                raise BrokerUnavailable("nats", servers, str(error)) from error
            return False  # gone (deleted, purged): not stored
        found: dict[str, Any] = stored.headers or {}
        same = (NATS_MSG_ID, f"{NATS_PREFIX}id")
        return stored.data == body and all(found.get(h) == headers.get(h) for h in same)

    @contextlib.contextmanager
    def _handing_off(self, subject: str, run: JobRun, reason: str) -> Iterator[HandOff | None]:
        if self._tracer is None:
            yield None
            return
        with handing_off(self._tracer, "nats", subject, run.attributes, reason) as hand_off:
            yield hand_off


def _message_id(stream: str, delivery: Delivery) -> str:
    """`dlq:<stream>:<sequence>:<stored>`: unique per stored message, the same for each
    delivery of it (see the module docstring)."""
    try:
        stored = delivery.handle.metadata.timestamp.strftime("%Y%m%dT%H%M%S.%f")
    except (AttributeError, ValueError):  # not a JetStream message: unique per attempt
        stored = uuid.uuid4().hex
    return f"dlq:{stream}:{delivery.offset}:{stored}"


# Headers of the original that a dead letter replaces: earlier details, the attempt, the id.
_REPLACED = {
    f"{NATS_PREFIX}{name}" for name in (*FAILURE_EXTENSIONS, *REDUCTION_EXTENSIONS, "jobattempt")
} | {NATS_MSG_ID.lower()}
