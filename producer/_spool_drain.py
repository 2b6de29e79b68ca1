"""Draining the spool: publishing spooled jobs, oldest first per destination, in the
background (`run`) or now (`flush`), over a broker connection it (re)makes.

Rules (docs/producer.md, "The spool"):

- The drainer (one task) connects with backoff and publishes the oldest jobs of each
  destination in batches of `drain_batch` with `send_many`, deleting a batch only after
  its receipts. A retriable failure (the broker is away) ends the round: it waits
  (`Backoff` from `retry_initial_s` to `retry_max_s`, jittered) and tries the same batches
  again from their first job: a repeat is the same job id (JetStream drops it within its
  duplicate window; workers skip a completed id).
- A permanent failure of a destination with the broker reachable (`DestinationMissing`)
  blocks only that destination (`BlockedDestinations`): its jobs stay, the other
  destinations keep draining. Errors about the job itself (`RecordTooLarge`,
  `InvalidAttributes`) move that job to the spool's `refused` table, with the reason, and
  the batch goes on one job at a time, in order.
- After `RECONNECT_AFTER` attempts in a row that cannot reach the broker, the drainer stops
  the publisher and connects a new one (a client may have given its connection up).
- Every `retry_max_s` (and at start) a round adopts the orphaned sibling slots
  (`SpoolSlots.adopt`), and lets them go once empty.
- One `publisher.start()` at a time (`connect_lock`), never cancelled half-way.

Log lines (logger `jobstream.producer`): one info line per drained batch, one when the
spool is empty again, with the counts, and a warning per round the broker cannot take jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from producer._errors import BrokerUnavailable, PublishError, RecordTooLarge
from producer._publisher import Publisher
from producer._settings import SpoolSettings
from producer._spool import Spool, SpooledJob
from producer._spool_blocked import BlockedDestinations
from producer._spool_slots import SpoolSlots
from producer.retrying import Backoff, is_testing
from schemas import InvalidAttributes

__all__ = ["RECONNECT_AFTER", "Prepare", "SpoolDrainer"]

log = logging.getLogger("jobstream.producer")

RECONNECT_AFTER = 5
"""Drain attempts in a row that fail with `BrokerUnavailable` before the drainer stops the
publisher and connects a new one."""

Prepare = Callable[[list[str]], Awaitable[None]]
"""Makes destinations ready before a send (`create_missing`); may raise `PublishError`."""


def _refused_for_good(error: Exception) -> bool:
    """An error about the job itself, which no retry can cure: it is set aside."""
    return isinstance(error, RecordTooLarge | InvalidAttributes)


class SpoolDrainer:
    """Publishes what `slots` hold through `publisher`. Owned by one `SpoolingSender`."""

    def __init__(
        self,
        publisher: Publisher,
        settings: SpoolSettings,
        prepare: Prepare,
        slots: SpoolSlots,
        backoff: Backoff,
    ) -> None:
        self._publisher = publisher
        self._settings = settings
        self._prepare = prepare
        self._slots = slots
        self._backoff = backoff
        self.blocks = BlockedDestinations(backoff)
        self.connected = False
        """The publisher is started (the broker was reached)."""
        self.connect_lock = asyncio.Lock()  # one `publisher.start()` at a time
        self.wake = asyncio.Event()
        """Set when a job is spooled: the background drainer looks again."""
        self._drain_lock = asyncio.Lock()
        self.spooling = False  # an outage is under way: logged once, until the spool empties
        self._failures = 0  # drain rounds in a row that failed (the broker is away)
        self._unreachable = 0  # of them, those that could not reach the broker
        self._adopt_at = 0.0
        self.spooled = 0
        """Jobs written to the spool since it was opened (counted by the sender)."""
        self.drained = 0
        """Jobs published from the spool since it was opened."""

    async def flush(self) -> int:
        """Publish every spooled job now, in this task; returns how many jobs were
        published from the spool meanwhile (by this call or the drainer). Raises
        `BrokerUnavailable` when the broker cannot be reached, or, once every other
        destination is published, the error of a blocked one (`DestinationMissing`)."""
        before = self.drained
        await self.connect()
        blocked: PublishError | None = None
        for spool in self._slots.all():
            for destination in list(spool.waiting):
                try:
                    while spool.waiting.get(destination):
                        if not await self._drain_batch(spool, destination):
                            break
                except PublishError as error:
                    if error.retriable:  # the broker is away: nothing else goes either
                        raise
                    await self.blocks.block(spool, destination, error)
                    blocked = blocked or error  # the other destinations go on
        if blocked is not None:
            raise blocked
        return self.drained - before

    async def try_blocked(self, destination: str) -> None:
        """Before a new job for a blocked destination: try its spooled jobs once more. The
        broker's permanent error raises (the job cannot go); a retriable one (the broker is
        away) does not: the job is spooled behind the others."""
        try:
            await self._drain_batch(self._slots.own, destination)
        except PublishError as error:
            if error.retriable:
                return
            await self.blocks.block(self._slots.own, destination, error)
            raise

    async def connect(self) -> None:
        async with self.connect_lock:
            if not self.connected:
                await self._publisher.start()
                self.connected = True
                log.info("spool: the broker is reachable; %d jobs to publish", self._slots.jobs())

    async def run(self) -> None:
        """The background drainer: rounds until cancelled."""
        if not self.connected:  # `open` has just tried: wait before the next attempt
            await asyncio.sleep(0.0 if is_testing() else self._backoff.wait(1))
        while True:
            self.wake.clear()
            try:
                wait_s = await self._drain_round()
            except Exception:  # a bug or a disk error: keep the jobs, try again later
                log.exception("spool: draining failed; trying again in %.1fs", self._backoff.max_s)
                wait_s = self._backoff.max_s
            if self._failures:  # the broker is away: new jobs being spooled change nothing
                await asyncio.sleep(0.0 if is_testing() else wait_s or 0.0)
                continue
            # Until a job is spooled, a blocked destination is due, or the next look around.
            timeout_s = self._settings.retry_max_s if wait_s is None else wait_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.wake.wait()

    async def _drain_round(self) -> float | None:
        """Connect if needed (anew after `RECONNECT_AFTER` failures to reach the broker),
        take orphaned sibling slots when due, then publish one batch per destination that
        is not waiting out a block. Returns the wait before the next round (None: nothing
        is waiting)."""
        if self._unreachable >= RECONNECT_AFTER:
            await self._disconnect()
        try:
            await self.connect()
            if time.monotonic() >= self._adopt_at:
                await self._slots.adopt()
                self._adopt_at = time.monotonic() + self._settings.retry_max_s
            for spool in self._slots.all():
                for destination in list(spool.waiting):
                    if self.blocks.due(destination):
                        await self._drain_destination(spool, destination)
        except PublishError as error:  # retriable: the broker is away, for every destination
            self._failures += 1
            if isinstance(error, BrokerUnavailable):
                self._unreachable += 1
            wait_s = self._backoff.wait(self._failures)
            log.warning(
                "spool: the broker cannot take spooled jobs yet (%s); next try in %.1fs",
                error,
                wait_s,
            )
            return wait_s
        self._failures = self._unreachable = 0
        await self._slots.let_go_of_empty()
        return self.blocks.wait_s([d for spool in self._slots.all() for d in spool.waiting])

    async def _drain_destination(self, spool: Spool, destination: str) -> None:
        """One batch for `destination`; a permanent failure blocks only it."""
        try:
            await self._drain_batch(spool, destination)
        except PublishError as error:
            if error.retriable:
                raise
            await self.blocks.block(spool, destination, error)

    async def _disconnect(self) -> None:
        """Stop the publisher, so the next connect starts a new client: one whose
        connection was given up for good (nats-py after its reconnect attempts) would
        otherwise fail for ever."""
        async with self.connect_lock:
            self._unreachable = 0
            self.connected = False
            log.warning("spool: the broker stays unreachable; reconnecting from scratch")
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._settings.retry_max_s):
                    await self._publisher.stop()

    async def _drain_batch(self, spool: Spool, destination: str) -> int:
        """Publish the oldest `drain_batch` jobs for `destination` and delete them; returns
        how many."""
        async with self._drain_lock:
            jobs = await spool.head(destination, self._settings.drain_batch)
            if not jobs:
                await self.blocks.unblock(spool, destination)
                return 0
            items = [(job.destination, job.message) for job in jobs]
            await self._prepare([destination])
            try:
                await self._publisher.send_many(items)
            except (PublishError, InvalidAttributes) as error:
                if not _refused_for_good(error):
                    raise
                return await self._drain_one_by_one(spool, jobs)
            await spool.delete(jobs)
            await self.blocks.unblock(spool, destination)
            self._drained(len(jobs))
            return len(jobs)

    async def _drain_one_by_one(self, spool: Spool, jobs: list[SpooledJob]) -> int:
        """After a permanent error of a batch: find the job(s) refused, keep the order.
        Returns how many jobs left the queue (published or refused)."""
        published = 0
        for job in jobs:
            try:
                await self._publisher.send(job.destination, job.message)
            except (PublishError, InvalidAttributes) as error:
                if not _refused_for_good(error):
                    raise
                log.error(
                    "spool: job %s to %s refused by the broker for good, kept in the spool's "
                    "refused table: %s",
                    job.message.attributes.id,
                    job.destination,
                    error,
                )
                await spool.refuse(job, str(error))
                continue
            await spool.delete([job])
            published += 1
            self._drained(1)
        return len(jobs)  # published or refused: none waits any more

    def _drained(self, count: int) -> None:
        self.drained += count
        left = self._slots.jobs()
        log.info("spool: published %d spooled jobs (%d left)", count, left)
        if not left:
            self.spooling = False
            log.info(
                "spool: empty again; %d jobs spooled and %d published from it since start",
                self.spooled,
                self.drained,
            )
