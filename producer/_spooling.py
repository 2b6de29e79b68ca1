"""Publishing through the spool: send when the broker takes jobs, spool when it cannot,
and drain the spool in the background (`JobProducer` with `spool.path` set).

The parts, one module each: the slot files held (`producer._spool_slots`), the drainer
(`producer._spool_drain`), the destinations blocked for now (`producer._spool_blocked`).

Rules (docs/producer.md, "The spool"):

- A send that fails with a retriable error (`BrokerUnavailable`, `PublishTimeout`,
  `BrokerBusy`) is appended to the spool, committed durably, and answered with a receipt
  `spooled=True` (partition None, offset -1). Any other error raises as without a spool.
- One FIFO per destination (a key lives in one destination): while the spool holds jobs
  for a destination, new jobs for it go to the spool behind them, so no job overtakes an
  earlier one of its key; jobs for other destinations are published directly. While the
  broker was never reached, every job is spooled.
- A new job for a destination blocked by a permanent failure with the broker reachable
  (`DestinationMissing`: run `jobstream topics ensure`) raises that error (after one more
  try of its spooled jobs), as without a spool: no receipt for a job that cannot go.
- `close` drains for up to `stop_drain_s`, then leaves the rest on disk for the next owner.
- One `publisher.start()` at a time, never cancelled half-way (a client cancelled while it
  connects is left half-open).

Log lines (logger `jobstream.producer`): a warning when an outage starts spooling, and one
per slot left with jobs at `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from producer._errors import PublishError, SpoolFull
from producer._publisher import Publisher, Receipt
from producer._settings import SpoolSettings
from producer._spool import Spool
from producer._spool_drain import Prepare, SpoolDrainer
from producer._spool_slots import SpoolSlots
from producer._spool_status import SpoolStatus
from producer.retrying import Backoff
from schemas import JobMessage

__all__ = ["Prepare", "SpoolingSender"]

log = logging.getLogger("jobstream.producer")


class SpoolingSender:
    """Sends encoded jobs through `publisher`, or spools them while the broker cannot
    take them; drains the spool in a background task. Owned by one `JobProducer`."""

    def __init__(self, publisher: Publisher, settings: SpoolSettings, prepare: Prepare) -> None:
        """`settings.path` must be set. Nothing is opened before `open`."""
        assert settings.path is not None
        self._publisher = publisher
        self._settings = settings
        self._prepare = prepare
        self._slots = SpoolSlots(settings)
        backoff = Backoff(settings.retry_initial_s, settings.retry_max_s, jitter=True)
        self._drain = SpoolDrainer(publisher, settings, prepare, self._slots, backoff)
        self._drainer: asyncio.Task[None] | None = None

    @property
    def spool(self) -> Spool:
        return self._slots.own

    @property
    def spooled(self) -> int:
        """Jobs this sender wrote to the spool since it was opened."""
        return self._drain.spooled

    @property
    def drained(self) -> int:
        """Jobs this sender published from the spool since it was opened."""
        return self._drain.drained

    async def open(self) -> None:
        """Own a slot of the spool path (`SpoolLocked` if other processes own them all,
        `NotASpool` if it is not a spool), try to reach the broker once
        (`publisher.start()`, bounded by its connect timeout) and start the drainer. A broker
        that cannot be reached is not an error: jobs are spooled."""
        spool = await self._slots.open()
        try:
            await self._publisher.start()
            self._drain.connected = True
        except PublishError as error:
            if not error.retriable:
                await self._slots.close()
                raise
            log.warning(
                "spool: broker not reachable at start (%s); spooling to %s", error, spool.path
            )
        except BaseException:  # a refused setting, a cancelled start: leave no lock behind
            await self._slots.close()
            raise
        if spool.jobs:
            log.info("spool: %d jobs waiting in %s; publishing them first", spool.jobs, spool.path)
        self._drainer = asyncio.create_task(self._drain.run(), name="jobstream-spool-drain")

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        """Publish one job, or spool it (see the module docstring)."""
        [receipt] = await self.send_many([(destination, message)])
        return receipt

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        """Publish the jobs, pipelined, or spool those the broker cannot take now or that
        must wait behind spooled jobs of their destination (a batch the broker took in part
        is spooled whole: repeats are by job id)."""
        spool = self.spool
        if not self._drain.connected:
            return await self._store(items, None)
        for destination in dict.fromkeys(d for d, _ in items if d in spool.blocked):
            await self._drain.try_blocked(destination)  # raises if it still cannot take jobs
        waiting = spool.waiting
        direct = [i for i, (d, _) in enumerate(items) if not waiting.get(d)]
        receipts: list[Receipt | None] = [None] * len(items)
        if direct:
            sent = [items[i] for i in direct]
            try:
                await self._prepare(list(dict.fromkeys(d for d, _ in sent)))
                if len(sent) == 1:
                    done = [await self._publisher.send(*sent[0])]
                else:
                    done = await self._publisher.send_many(sent)
            except PublishError as error:
                if not error.retriable:
                    raise
                done = await self._store(sent, error)
            for i, receipt in zip(direct, done, strict=True):
                receipts[i] = receipt
        if len(direct) < len(items):
            queued = [i for i, (d, _) in enumerate(items) if receipts[i] is None]
            stored = await self._store([items[i] for i in queued], None)
            for i, receipt in zip(queued, stored, strict=True):
                receipts[i] = receipt
        return [receipt for receipt in receipts if receipt is not None]

    async def flush(self) -> int:
        """`SpoolDrainer.flush`: publish every spooled job now, in this task."""
        return await self._drain.flush()

    async def flush_every_slot(self) -> tuple[int, list[Path]]:
        """Without owning a slot (`jobstream spool flush`): take every slot file of the
        spool path that no process owns, publish what they hold, and let them go. Returns
        the jobs published and the slot files other processes own (not published here).
        Raises as `flush`, and `NotASpool`; the publisher is left to the caller."""
        try:
            busy = await self._slots.take_every_free()
            if not self._slots.jobs():
                return 0, busy
            return await self.flush(), busy
        finally:
            await self._slots.close()

    async def status(self) -> SpoolStatus:
        """What this process's slot file holds."""
        return await self.spool.status()

    async def close(self) -> None:
        """Drain for up to `stop_drain_s`, stop the drainer, close the spool. Idempotent.
        Also waits for a connect attempt under way (at most the connect timeout)."""
        drainer = self._drainer
        if not self._slots.is_open:
            return
        if self._slots.jobs() and self._settings.stop_drain_s > 0:
            try:
                async with asyncio.timeout(self._settings.stop_drain_s):
                    await self.flush()
            except (TimeoutError, PublishError) as error:
                log.warning("spool: stopping with jobs left (%s)", error or "out of time")
        if drainer is not None:
            # Never in the middle of `publisher.start()`: a client cancelled while it
            # connects is left half-open. So wait for a connect under way to end.
            async with self._drain.connect_lock:
                drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
        for each in self._slots.all():
            if each.jobs:
                log.warning(
                    "spool: %d jobs left in %s; the next producer on this path publishes them",
                    each.jobs,
                    each.path,
                )
        self._drainer = None
        self._drain.connected = False
        await self._slots.close()

    async def _store(
        self, items: Sequence[tuple[str, JobMessage]], error: PublishError | None
    ) -> list[Receipt]:
        spool = self.spool
        first = not self._drain.spooling
        self._drain.spooling = True  # before the await: concurrent callers log nothing more
        try:
            await spool.append(items)
        except SpoolFull as full:
            raise full from error
        self._drain.spooled += len(items)
        if first:
            why = error if error is not None else "the broker is not reachable yet"
            log.warning(
                "spool: spooling jobs to %s until the broker takes them (%s)", spool.path, why
            )
        self._drain.wake.set()
        transport = self._publisher.transport
        return [Receipt(m.attributes.id, transport, d, None, -1, spooled=True) for d, m in items]
