"""`CronScheduler`: the leading replica publishes each tick of the app's schedules, once.

Every replica runs one; only the one that holds the lease (`Leadership`) publishes. At
each turn (at every tick, and every third of `cron.lease_s`) the leader looks at the
*candidate* ticks of each schedule: those of the last `cron.grace_s`, plus the newest
`catch_up` ticks before them. For each candidate it has not handled yet:

1. it claims the tick's marker `cron:<app>:<schedule>:<tick>` in the store: recorded
   complete means the tick was published (by it or a former leader): skip;
2. it publishes the tick's job, whose id is deterministic (`CronSchedule.job_id`), and
   only then records the marker complete, kept as long as the tick can be a candidate.

So a leader killed at a tick, before or after its publish, loses nothing: its successor
takes the lease over within about 1.4 leases (less than `grace_s`, checked by the
settings) and publishes every candidate without a marker; a tick published but not
marked is published again with the same id, and deduplicated (NATS: `Nats-Msg-Id` within
the stream's duplicate window; every broker: the workers' idempotency store, which skips
a job id already completed and holds a second delivery while the first runs).

Catch-up reaches back `retention_s` at most (less a grace and a lease): no marker is
asked to outlive the store's retention (`idempotency.retention_s`, which is also the
NATS KV bucket's age limit), so a tick is never a candidate after its marker is gone.

A schedule the store has never seen (no `cron:<app>:<schedule>:known` marker, written
again every hour while a replica leads) marks its catch-up candidates without publishing
them: a new schedule does not catch up the ticks before it existed. With a per-process
store (memory), its candidates within the grace are marked too, so a restarted worker
does not publish again the ticks it published just before.

Bounds: at most `MAX_TICKS_PER_TURN` ticks of one schedule per turn (the newest), at most
`MAX_CATCH_UP` caught up; markers expire after the span they can be candidates for
(`grace_s` plus `catch_up` ticks, at most `MAX_MARKER_S`); the ticks remembered in memory
are those still candidates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from consumer.core import CronSchedule, CronSettings
from consumer.runtime._leadership import Leadership
from consumer.stores import ClaimState, IdempotencyStore
from schemas import Job

log = logging.getLogger("jobstream.cron")

__all__ = ["MAX_MARKER_S", "MAX_TICKS_PER_TURN", "CronScheduler", "TickPublisher"]

MAX_TICKS_PER_TURN = 1000
"""Most ticks of one schedule a turn looks at (a seconds schedule with a long grace)."""
MAX_MARKER_S = 400 * 86_400.0
"""Longest a tick's marker is kept (a monthly schedule that catches up a year)."""
_KNOWN_S = 30 * 86_400.0  # a schedule's "known" marker (at most the store's retention)
_KNOWN_REFRESH_S = 3600.0  # ... rewritten this often (or a quarter of it) while leading
_RETRY_S = 1.0  # after a store or broker error


class TickPublisher(Protocol):
    """What publishes a tick's job (a `producer.JobProducer`)."""

    async def publish(
        self, job: Job, *, key: str | None = ..., id: str | None = ..., subject: str | None = ...
    ) -> object: ...


class CronScheduler:
    """The app's schedules on this replica: publishes their ticks while it leads."""

    def __init__(
        self,
        app: str,
        schedules: list[CronSchedule],
        store: IdempotencyStore,
        publisher: TickPublisher,
        settings: CronSettings,
        token: str,
        *,
        retention_s: float = MAX_MARKER_S,
        per_process: bool = False,
        now: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """`retention_s`: the longest the store keeps a record (`idempotency.retention_s`,
        the NATS KV bucket's age limit): no marker is asked to live longer, and no tick
        older than a marker can live is a candidate. `per_process`: the store lives and dies
        with this process (the memory store), so a schedule it has not seen may have been
        published before a restart: none of its candidates is published at first sight.
        `now` (aware, UTC) and `monotonic` are the clocks (a test passes fakes)."""
        self._app = app
        self._schedules = schedules
        self._store = store
        self._publisher = publisher
        self._settings = settings
        self._token = token
        self._now = now if now is not None else _utc_now
        self._monotonic = monotonic if monotonic is not None else time.monotonic
        self._retention_s = min(retention_s, MAX_MARKER_S)
        self._per_process = per_process
        lease = f"cron:{app}:leader"
        self.leadership = Leadership(store, lease, token, settings.lease_s, self._monotonic)
        self._done: dict[str, set[datetime]] = {}  # ticks handled while leading
        self._known: dict[str, float] = {}  # schedule -> when its "known" marker was written
        self.published: deque[tuple[str, datetime, str]] = deque(maxlen=1000)
        """The last ticks this replica published: (schedule, tick, job id)."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Turn until `stopping` is set; errors are logged and retried after a second."""
        while not stopping.is_set():
            try:
                wait = await self.turn()
            except Exception as error:  # noqa: BLE001 - a store or broker away: retried
                log.warning("cron: turn failed, retrying in %.0fs: %r", _RETRY_S, error)
                wait = _RETRY_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stopping.wait()

    async def turn(self) -> float:
        """Renew or take the lease; while leading, publish every due tick not yet
        published. Returns the seconds until the next turn is due."""
        leading = await self.leadership.refresh()
        now = self._now()
        failed = False
        if not leading:
            self._done.clear()  # a future lead reads the markers again
            self._known.clear()
        for schedule in self._schedules if leading else []:
            try:
                await self._publish_due(schedule, now)
            except Exception as error:  # noqa: BLE001 - one schedule's fault stops no other
                log.warning(
                    "cron: schedule %s: %r; its ticks are tried again while within the grace",
                    schedule.name,
                    error,
                )
                failed = True
        wait = self._wait(self._now())
        return min(wait, _RETRY_S) if failed else wait

    async def resign(self) -> None:
        """Give the lead up (a graceful stop)."""
        await self.leadership.resign()

    def _wait(self, now: datetime) -> float:
        wait = self._settings.lease_s / 3
        for schedule in self._schedules:
            following = schedule.next_tick(now)
            if following is not None:
                wait = min(wait, (following - now).total_seconds())
        return max(wait, 0.0)

    def _candidates(self, schedule: CronSchedule, now: datetime) -> tuple[list[datetime], ...]:
        """(catch-up ticks, ticks within the grace), each oldest first."""
        settings = self._settings
        edge = now - timedelta(seconds=settings.grace_s)
        on_time = schedule.newest_ticks(edge, now, MAX_TICKS_PER_TURN)
        floor = now - timedelta(seconds=self._retention_s - settings.grace_s - settings.lease_s)
        late = [tick for tick in schedule.ticks_before(edge, schedule.catch_up) if tick > floor]
        return late, on_time

    async def _publish_due(self, schedule: CronSchedule, now: datetime) -> None:
        late, on_time = self._candidates(schedule, now)
        done = self._done.setdefault(schedule.name, set())
        known = self._known.get(schedule.name)
        if known is None:
            await self._know(schedule, [*late, *on_time] if self._per_process else late)
        elif self._monotonic() - known >= min(_KNOWN_REFRESH_S, self._retention_s / 4):
            await self._know(schedule, [])  # rewritten only: this lead published its past
        for tick in [*late, *on_time]:
            if tick in done:
                continue
            if not await self.leadership.hold():  # a long turn renews; a lost lease stops it
                return
            if await self._publish_once(schedule, tick):
                done.add(tick)
        oldest = (late or on_time or [now])[0]
        done.difference_update({tick for tick in done if tick < oldest})

    async def _know(self, schedule: CronSchedule, past: list[datetime]) -> None:
        """Mark `past` as published if the store has never seen the schedule: a new
        schedule has no missed ticks to catch up (and, with a per-process store, a
        restarted process cannot tell which of its recent ticks it published)."""
        key = f"cron:{self._app}:{schedule.name}:known"
        state = await self._store.claim(key, self._token, self._settings.lease_s)
        if state is ClaimState.CLAIMED and past:
            log.info(
                "cron: new schedule %s: its %d past ticks are not published",
                schedule.name,
                len(past),
            )
            for tick in past:
                retention = self._retention(schedule, tick)
                await self._store.complete(self._marker(schedule, tick), self._token, retention)
        await self._store.complete(key, self._token, min(_KNOWN_S, self._retention_s))
        self._known[schedule.name] = self._monotonic()

    async def _publish_once(self, schedule: CronSchedule, tick: datetime) -> bool:
        """Publish `tick` unless its marker says it was; False if this replica lost the
        lead before it could (the tick is then its successor's)."""
        marker = self._marker(schedule, tick)
        state = await self._store.claim(marker, self._token, self._settings.lease_s)
        if state is ClaimState.COMPLETED:
            return True
        job_id = schedule.job_id(self._app, tick)
        if not self.leadership.leading:  # fenced right before the publish: paused meanwhile
            if state is ClaimState.CLAIMED:
                await self._store.release(marker, self._token)
            return False
        try:
            await self._publisher.publish(
                _job_of(schedule, tick),
                key=schedule.key,
                id=job_id,
                subject=f"cron/{schedule.name}/{tick.isoformat()}",
            )
        except BaseException:
            if state is ClaimState.CLAIMED:
                with contextlib.suppress(Exception):
                    await self._store.release(marker, self._token)
            raise
        await self._store.complete(marker, self._token, self._retention(schedule, tick))
        self.published.append((schedule.name, tick, job_id))
        late_s = (self._now() - tick).total_seconds()
        log.info(
            "cron: published tick %s of %s as job %s (%.3fs after its time)",
            tick.isoformat(),
            schedule.name,
            job_id,
            late_s,
        )
        return True

    def _marker(self, schedule: CronSchedule, tick: datetime) -> str:
        return f"cron:{self._app}:{schedule.name}:{tick.isoformat()}"

    def _retention(self, schedule: CronSchedule, tick: datetime) -> float:
        """How long `tick` can still be a candidate: `grace_s` after the `catch_up`-th tick
        after it, with a lease to spare."""
        span = schedule.span(tick, schedule.catch_up).total_seconds()
        settings = self._settings
        return min(span + settings.grace_s + settings.lease_s, self._retention_s)


def _job_of(schedule: CronSchedule, tick: datetime) -> Job:
    """The tick's job. The app's job function is untrusted: whatever it raises (`SystemExit`,
    `KeyboardInterrupt`, a `BaseException` of its own) is that schedule's failure, retried
    as any, never the end of the scheduler. (It is called synchronously: a cancellation of
    the scheduler cannot arrive inside it.)"""
    try:
        return schedule.job_at(tick)
    except BaseException as error:  # re-raised as an Exception: see the docstring
        msg = f"cron schedule {schedule.name!r}: its job function raised {error!r}"
        raise RuntimeError(msg) from error


def _utc_now() -> datetime:
    return datetime.now(UTC)
