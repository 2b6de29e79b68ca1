"""Delayed jobs on NATS JetStream: JetStream's message scheduler waits, not the worker
(issue 15, docs/scheduling.md).

A message whose `not_before` is ahead (a delayed job, not yet run) is not handed out.
`Schedules` publishes a copy of it to the job stream as a **schedule message** (ADR-51,
nats-server 2.12+): subject `<job subject>._scheduled.<stream sequence>`, headers
`Nats-Schedule: @at <not_before>` and `Nats-Schedule-Target: <the subject it came from>`,
same body and other headers; only after the PubAck is the original acknowledged. At
`not_before` the server publishes the copy to the target subject (without the schedule
headers, with `Nats-Scheduler`) and removes the schedule message: a new stream message,
delivered for the first time (attempt 1, no `max_deliver` spent), holding no
`max_ack_pending` slot while it waits, and nothing in any worker.

- Never lost: the original is acked only after the schedule message was stored; a crash
  between leaves the original unacknowledged, and its redelivery is scheduled again under
  the same `Nats-Msg-Id` (`schedule:<stream>:<sequence>:<job id>`: stored once within the
  duplicate window; past it two copies run, the idempotency store skips the second).
- A message the scheduler produced (`Nats-Scheduler`) runs, even if this worker's clock
  says it is a little early: the time is the server's.
- A job due more than `MAX_DELAY_S`, or more than the stream's `max_age` less a minute (the
  schedule message would expire unfired), is handed out with `DelayTooLong`: the runtime
  dead-letters it (`delay-too-long`).
- A stream without `allow_msg_schedules` (not provisioned by this version: run `jobstream
  topics ensure`) refuses the schedule message; the job is then handed back with
  `nak(delay)` (logged), which spends one delivery: it runs as attempt 2.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from consumer.core import (
    MAX_DELAY_S,
    Deferrals,
    DelayTooLong,
    Delivery,
    Outcome,
    Settings,
    WorkerError,
    remaining_s,
)
from consumer.runtime import until_acknowledged
from producer import PublishError, Receipt
from schemas.names import NATS_MSG_ID

log = logging.getLogger("jobstream.nats")

SCHEDULED = "_scheduled"
"""The subject token of schedule messages: `<job subject>._scheduled.<sequence>`."""
SCHEDULER = "Nats-Scheduler"
_MAX_AGE_MARGIN_S = 60.0
_ALMOST_A_MS = timedelta(microseconds=999)

Publish = Callable[[str, dict[str, str], bytes], Awaitable[Receipt]]
Nak = Callable[[Delivery, float], Awaitable[bool]]


def schedule_subjects(subjects: list[str]) -> list[str]:
    """What the stream must capture for the schedule messages of `subjects`."""
    return [f"{subject}.{SCHEDULED}.>" for subject in subjects]


class Schedules:
    """Takes the deliveries not due yet out of the run and lets JetStream schedule them."""

    def __init__(
        self,
        settings: Settings,
        main_subject: Callable[[Delivery], str],
        settle: Callable[[Delivery, Outcome], None],
        nak: Nak,
    ) -> None:
        self._stream = settings.routing.stream
        max_age = settings.routing.stream_max_age_s
        self.limit_s = min(MAX_DELAY_S, max_age - _MAX_AGE_MARGIN_S) if max_age else MAX_DELAY_S
        """The longest delay kept: beyond it a job is dead-lettered."""
        self._timeout_s = settings.retry.hand_off_timeout_s
        self._main_subject = main_subject
        self._settle = settle
        self._nak = nak
        self._publish: Publish | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None
        self.deferrals = Deferrals()
        """Delayed first attempts handed to the scheduler (`scheduled`)."""

    def publish_with(self, publish: Publish) -> None:
        """Publish schedule messages with `publish` (the backend's publisher) from now on;
        until then every message is handed out as it comes."""
        self._publish = publish

    def take(self, delivery: Delivery) -> Delivery | None:
        """The delivery to hand out now, or None: it is being scheduled."""
        publish = self._publish
        headers = dict(delivery.raw_headers)
        if publish is None or delivery.attributes is None or SCHEDULER in headers:
            return delivery
        due = delivery.attributes.not_before
        remaining = remaining_s(delivery.attributes, datetime.now(UTC))
        if due is None or remaining <= 0:
            return delivery
        if remaining > self.limit_s:
            too_long = DelayTooLong(remaining, self.limit_s)
            return replace(delivery, attributes=None, error=too_long)
        task = asyncio.create_task(
            self._schedule(publish, delivery, delivery.attributes.id, due, remaining)
        )
        self._running.add(task)
        task.add_done_callback(self._done)
        self.deferrals.add(delivery.attributes)
        return None

    async def _schedule(
        self, publish: Publish, delivery: Delivery, job_id: str, due: datetime, remaining: float
    ) -> None:
        # Milliseconds on the wire, rounded up: never before `not_before`.
        at = (due.astimezone(UTC) + _ALMOST_A_MS).isoformat(timespec="milliseconds")
        headers = {
            name: (value or b"").decode()
            for name, value in delivery.raw_headers
            if name != NATS_MSG_ID
        }
        headers |= {
            NATS_MSG_ID: f"schedule:{self._stream}:{delivery.offset}:{job_id}",
            "Nats-Schedule": f"@at {at.replace('+00:00', 'Z')}",
            "Nats-Schedule-Target": delivery.topic,
        }
        subject = f"{self._main_subject(delivery)}.{SCHEDULED}.{delivery.offset}"
        try:
            await until_acknowledged(
                lambda: publish(subject, headers, delivery.body), self._timeout_s, delivery.describe
            )
        except PublishError as refused:  # permanent: e.g. the stream allows no schedules
            log.error(
                "JetStream refused to schedule %s (%s): handed back with a delay instead, "
                "which spends a delivery; run `jobstream topics ensure` to allow message "
                "schedules on stream %s",
                delivery.describe,
                refused,
                self._stream,
            )
            await self._nak(delivery, remaining)
            return
        log.debug("%s scheduled for %s", delivery.describe, at)
        self._settle(delivery, Outcome.COMPLETED)  # acknowledged: the copy carries the job

    def raise_if_failed(self) -> None:
        error = self._failed
        if error is not None:
            msg = f"a delayed job could not be scheduled: {error}"
            raise WorkerError(msg) from error

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the schedule messages under way; one cut off leaves its
        original unacknowledged: redelivered, and scheduled again."""
        if self._running:
            await asyncio.wait(self._running, timeout=timeout_s)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed = self._failed or task.exception()
