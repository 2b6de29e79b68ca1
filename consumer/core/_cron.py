"""Cron schedules: which job an app publishes at which times, and each tick's job id.

```python
@app.cron("*/5 * * * *", tz="Europe/Paris")
@app.handler(PurgeSessions)
async def purge(job: PurgeSessions, ctx: JobContext) -> None: ...

app.schedule(CronSchedule("0 3 * * *", job=lambda tick: Report(day=tick.date())))
```

Expressions are read by cronsim (five fields, or six with seconds first; `L`, `W`, `#`;
Debian cron's handling of daylight saving time in the schedule's time zone). A tick's job
id is a UUIDv5 of the app, the schedule's name and the tick's UTC time, so every replica
that publishes the same tick publishes the same job (deduplicated by `Nats-Msg-Id` and by
the workers' idempotency store). Which replica publishes, and when, is
`consumer/runtime/_cron.py`'s; docs/scheduling.md#cron says what is promised.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from schemas import Job

__all__ = ["MAX_CATCH_UP", "TICK_NAMESPACE", "CronSchedule", "JobFactory"]

MAX_CATCH_UP = 100
"""Most missed ticks a schedule publishes late after an outage (`catch_up`)."""
TICK_NAMESPACE = uuid.UUID("5f0c6f8e-2a51-4c43-9d0e-6a3b1c7e2f15")
"""The UUIDv5 namespace of tick job ids (fixed: changing it would run ticks twice)."""

JobFactory = Job | type[Job] | Callable[[datetime], Job]
"""What a schedule publishes at a tick: one job (the same payload every time), a job
model (built with no arguments), or a function of the tick's time (in the schedule's
time zone) that returns the job."""
_TICK = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A job published at every time a cron expression names, by one replica of the app."""

    expression: str
    """Five fields (`minute hour day-of-month month day-of-week`), or six with seconds
    first (`*/2 * * * * *`: every 2 s), as cronsim reads them."""
    job: JobFactory
    """What to publish at each tick (see `JobFactory`)."""
    tz: str = "UTC"
    """IANA time zone the expression is read in (`Europe/Paris`)."""
    name: str = ""
    """Identifies the schedule in tick ids and in the store (default: the job type). Two
    schedules of one app need different names; renaming one re-runs the tick at hand."""
    catch_up: int = 0
    """Ticks missed while no replica could publish (beyond `cron.grace_s`) that are still
    published, late, the newest ones, when a replica leads again; 0: missed ticks are
    skipped. At most `MAX_CATCH_UP`."""
    key: str | None = None
    """Ordering key of the published jobs: with `worker.ordering = key`, ticks of one key
    never run at the same time, and run in tick order."""

    def __post_init__(self) -> None:
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as error:
            msg = f"cron schedule {self.expression!r}: unknown time zone {self.tz!r}"
            raise ValueError(msg) from error
        try:
            CronSim(self.expression, datetime.now(zone))
        except CronSimError as error:
            msg = f"cron expression {self.expression!r} cannot be read: {error}"
            raise ValueError(msg) from error
        if not 0 <= self.catch_up <= MAX_CATCH_UP:
            msg = f"catch_up must be between 0 and {MAX_CATCH_UP}, got {self.catch_up}"
            raise ValueError(msg)
        sample = self.job_at(datetime.now(zone)) if not _is_function(self.job) else None
        if not self.name:
            if sample is None:
                msg = f"cron schedule {self.expression!r} publishes from a function: name it"
                raise ValueError(msg)
            object.__setattr__(self, "name", sample.job_type)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def job_at(self, tick: datetime) -> Job:
        """The job of the tick at `tick` (a `TypeError` if the factory returns no job)."""
        factory = self.job
        job: object
        if isinstance(factory, Job):
            job = factory
        elif _is_function(factory):
            job = cast("Callable[[datetime], object]", factory)(tick.astimezone(self.zone))
        else:
            job = cast("type[Job]", factory)()
        if not isinstance(job, Job):
            msg = f"cron schedule {self.name!r}: its job function returned {job!r}, not a Job"
            raise TypeError(msg)
        return job

    def job_id(self, app: str, tick: datetime) -> str:
        """The tick's job id: the same on every replica, for every publish of the tick."""
        when = tick.astimezone(UTC).isoformat(timespec="microseconds")
        return str(uuid.uuid5(TICK_NAMESPACE, f"{app}\n{self.name}\n{when}"))

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The ticks in `(after, until]`, oldest first, in UTC."""
        after, until = after.astimezone(UTC), until.astimezone(UTC)
        for local in CronSim(self.expression, after.astimezone(self.zone)):
            tick = local.astimezone(UTC)  # compared in UTC: `fold` counts there
            if tick > until:
                return
            # From a time in the repeated hour of a change back from daylight saving time
            # (`fold=1`), cronsim can yield a tick of that hour's first pass, which is
            # already past: skipped, as Debian's cron runs such a tick once.
            if tick > after:
                yield tick

    def newest_ticks(self, after: datetime, until: datetime, count: int) -> list[datetime]:
        """The newest `count` ticks in `(after, until]`, oldest first, in UTC: `count`
        steps of cronsim at most, however many ticks the span holds."""
        found: list[datetime] = []
        start = (until.astimezone(UTC) + _TICK).astimezone(self.zone)
        for local in CronSim(self.expression, start, reverse=True):
            tick = local.astimezone(UTC)
            if tick <= after or len(found) >= count:
                break
            if tick <= until:  # (as `ticks`: never a tick on the wrong side of a DST change)
                found.append(tick)
        return found[::-1]

    def ticks_before(self, until: datetime, count: int) -> list[datetime]:
        """The newest `count` ticks at or before `until`, oldest first, in UTC."""
        found: list[datetime] = []
        if count <= 0:
            return found
        for tick in CronSim(self.expression, (until + _TICK).astimezone(self.zone), reverse=True):
            found.append(tick.astimezone(UTC))
            if len(found) >= count:
                break
        return found[::-1]

    def next_tick(self, after: datetime) -> datetime | None:
        """The first tick after `after` (None if none comes in cronsim's 50 years)."""
        return next(iter(self.ticks(after, datetime.max.replace(tzinfo=UTC))), None)

    def span(self, tick: datetime, ticks: int) -> timedelta:
        """From `tick` to the `ticks`-th tick after it (zero for 0 ticks)."""
        last = tick
        for _ in range(ticks):
            following = self.next_tick(last)
            if following is None:
                break
            last = following
        return last - tick


def _is_function(factory: JobFactory) -> bool:
    return not isinstance(factory, Job) and not (
        isinstance(factory, type) and issubclass(factory, Job)
    )
