"""Cron schedules (issue 15): the schedule and its ticks, the app's API, and replicas that
share one store publishing each tick once, on a fake clock (`CronScheduler.turn`), then on
real workers over the memory broker (`TestApp`), a leader crashed included."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import cronsim
import pytest
from pydantic import ValidationError

from consumer import App, CronSchedule, JobContext, MemoryIdempotencyStore, open_worker
from consumer.core import MAX_CATCH_UP, CronSettings, Settings
from consumer.core import _cron as cron_module
from consumer.memory import MemoryBackend, TestApp
from consumer.runtime import CronScheduler
from consumer.runtime._cron import MAX_TICKS_PER_TURN
from consumer.stores import ClaimState
from producer.memory import MemoryBroker
from schemas import Job

START = datetime(2026, 11, 30, 10, 0, 0, 500_000, tzinfo=UTC)


class Purge(Job, type="test.cron.purge", version=1):
    older_than_days: int = 30


class Report(Job, type="test.cron.report", version=1):
    day: str


class Clock:
    """A wall clock and a monotonic clock that move only when told."""

    def __init__(self, start: datetime = START) -> None:
        self.wall = start
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


class Published:
    """What the replicas published, in order: (job id, job, key, subject)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Job, str | None, str | None]] = []
        self.fail_after_publish = False

    async def publish(
        self,
        job: Job,
        *,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        subject: str | None = None,
    ) -> object:
        assert id is not None
        self.jobs.append((id, job, key, subject))
        if self.fail_after_publish:  # stored, but the answer never came (a kill, a timeout)
            raise ConnectionError("lost the connection after the publish")
        return None

    @property
    def ids(self) -> list[str]:
        return [job_id for job_id, _, _, _ in self.jobs]


def scheduler(
    schedule: CronSchedule,
    store: MemoryIdempotencyStore,
    clock: Clock,
    published: Published,
    token: str,
    settings: CronSettings | None = None,
) -> CronScheduler:
    """A replica; `per_process` (as a worker with the memory store) so that the ticks
    before the test's start count as published, as they would be in a running group."""
    return CronScheduler(
        "app",
        [schedule],
        store,
        published,
        settings or CronSettings(lease_s=3, grace_s=10),
        token,
        per_process=True,
        now=clock.now,
        monotonic=clock.monotonic,
    )


def tick_ids(schedule: CronSchedule, after: datetime, until: datetime) -> list[str]:
    return [schedule.job_id("app", tick) for tick in schedule.ticks(after, until)]


# -- the schedule -------------------------------------------------------------------------


def test_a_schedule_reads_its_expression_in_its_time_zone() -> None:
    schedule = CronSchedule("0 3 * * *", Purge, tz="Europe/Paris")
    assert schedule.name == "test.cron.purge"
    ticks = list(schedule.ticks(START, START + timedelta(days=2)))
    # 03:00 in Paris is 02:00 UTC in winter
    assert ticks == [datetime(2026, 12, 1, 2, tzinfo=UTC), datetime(2026, 12, 2, 2, tzinfo=UTC)]
    assert schedule.ticks_before(START, 2) == [
        datetime(2026, 11, 29, 2, tzinfo=UTC),
        datetime(2026, 11, 30, 2, tzinfo=UTC),
    ]
    assert schedule.next_tick(START) == ticks[0]
    assert schedule.span(ticks[0], 1) == timedelta(days=1)


def test_six_fields_are_seconds_first() -> None:
    schedule = CronSchedule("*/2 * * * * *", Purge)
    ticks = list(schedule.ticks(START, START + timedelta(seconds=6)))
    assert [t.second for t in ticks] == [2, 4, 6]


def test_a_ticks_job_id_is_the_same_everywhere_and_differs_per_tick_schedule_and_app() -> None:
    schedule = CronSchedule("* * * * *", Purge)
    tick = datetime(2026, 11, 30, 10, 1, tzinfo=UTC)
    assert schedule.job_id("app", tick) == schedule.job_id("app", tick.astimezone())
    assert schedule.job_id("app", tick) == CronSchedule("* * * * *", Purge).job_id("app", tick)
    assert schedule.job_id("app", tick) != schedule.job_id("app", tick + timedelta(minutes=1))
    assert schedule.job_id("app", tick) != schedule.job_id("other", tick)
    renamed = CronSchedule("* * * * *", Purge, name="purge-2")
    assert renamed.job_id("app", tick) != schedule.job_id("app", tick)


def test_what_a_schedule_publishes() -> None:
    tick = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    assert CronSchedule("* * * * *", Purge).job_at(tick) == Purge()
    assert CronSchedule("* * * * *", Purge(older_than_days=2)).job_at(tick) == Purge(
        older_than_days=2
    )
    by_day = CronSchedule(
        "* * * * *",
        lambda tick: Report(day=tick.date().isoformat()),
        tz="Europe/Paris",
        name="report",
    )
    assert by_day.job_at(tick) == Report(day="2026-12-01")  # the tick in the schedule's zone


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"expression": "61 * * * *"}, "cannot be read"),
        ({"expression": "* * *"}, "cannot be read"),
        ({"tz": "Mars/Olympus"}, "unknown time zone"),
        ({"catch_up": MAX_CATCH_UP + 1}, "catch_up must be between"),
        ({"catch_up": -1}, "catch_up must be between"),
        ({"job": lambda tick: Purge()}, "name it"),
        ({"job": Report}, "day"),  # a model that needs arguments fails at once
    ],
)
def test_a_bad_schedule_is_refused_when_declared(arguments: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"expression": "* * * * *", "job": Purge, **arguments}
    with pytest.raises((ValueError, ValidationError), match=message):
        CronSchedule(**values)


def test_the_app_declares_schedules_above_its_handlers() -> None:
    app = App("cron")

    @app.cron("*/5 * * * *", tz="Europe/Paris")
    @app.handler(Purge)
    async def purge(job: Purge, ctx: JobContext) -> None: ...

    @app.cron("0 3 * * *", job=lambda tick: Report(day=str(tick.date())), name="daily")
    @app.cron("0 * * * *", job=Report(day="hourly"), name="hourly", catch_up=2)
    @app.handler(Report)
    async def report(job: Report, ctx: JobContext) -> None: ...

    app.schedule(CronSchedule("0 0 * * *", Purge(older_than_days=1), name="midnight"))
    assert [(s.name, s.expression, s.tz) for s in app.schedules] == [
        ("test.cron.purge", "*/5 * * * *", "Europe/Paris"),
        ("hourly", "0 * * * *", "UTC"),
        ("daily", "0 3 * * *", "UTC"),
        ("midnight", "0 0 * * *", "UTC"),
    ]
    assert app.schedules[1].catch_up == 2
    with pytest.raises(ValueError, match=r"already has a cron schedule named 'test\.cron\.purge'"):
        app.schedule(CronSchedule("0 1 * * *", Purge))

    with pytest.raises(TypeError, match=r"put @app.cron\(...\) above @app.handler\(Model\)"):

        @app.cron("* * * * *")
        async def stray(job: Purge, ctx: JobContext) -> None: ...


def test_the_grace_covers_a_failover() -> None:
    with pytest.raises(ValidationError, match=r"at least twice cron\.lease_s"):
        CronSettings(lease_s=10, grace_s=15)
    assert Settings.model_construct().cron == CronSettings(lease_s=10, grace_s=30)


# -- replicas on a fake clock -------------------------------------------------------------


async def turn_all(replicas: list[CronScheduler], clock: Clock, seconds: float) -> None:
    """Advance the clock in steps of 0.25 s for `seconds`, every replica turning each step."""
    for _ in range(round(seconds / 0.25)):
        clock.advance(0.25)
        for replica in replicas:
            await replica.turn()


async def test_two_replicas_publish_each_tick_once_and_one_leads() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    start = clock.now()
    await turn_all([a, b], clock, 40)
    assert published.ids == tick_ids(schedule, start, clock.now())
    assert len(published.ids) == 20
    assert a.leadership.leading != b.leadership.leading
    assert len(a.published) + len(b.published) == 20
    _, job, key, subject = published.jobs[0]
    assert (job, key) == (Purge(), None)
    assert subject == "cron/test.cron.purge/2026-11-30T10:00:02+00:00"


async def test_a_dead_leaders_ticks_are_published_by_the_replica_that_takes_over() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    start = clock.now()
    await turn_all([a, b], clock, 10)
    leader, other = (a, b) if a.leadership.leading else (b, a)
    # The leader dies right at a tick: it neither publishes nor renews any more.
    clock.advance(1.5)  # the clock is at the tick of 10:00:12
    await other.turn()
    assert not other.leadership.leading
    await turn_all([other], clock, 28.5)
    assert other.leadership.leading
    expected = tick_ids(schedule, start, clock.now())
    assert published.ids == expected, "every tick once, in order, none lost while leaderless"
    assert len(expected) == 20
    assert len(leader.published) == 5


async def test_a_leader_killed_between_its_publish_and_its_marker_is_deduplicated() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    start = clock.now()
    await turn_all([a, b], clock, 3.25)
    leader, other = (a, b) if a.leadership.leading else (b, a)
    published.fail_after_publish = True
    await turn_all([leader], clock, 0.5)  # the tick of 10:00:04: published, not marked
    published.fail_after_publish = False
    await turn_all([other], clock, 20)
    ids = published.ids
    assert set(ids) == set(tick_ids(schedule, start, clock.now()))
    twice = [job_id for job_id in set(ids) if ids.count(job_id) > 1]
    assert twice == [schedule.job_id("app", datetime(2026, 11, 30, 10, 0, 4, tzinfo=UTC))]


async def test_a_schedule_that_fails_holds_up_no_other() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()

    def broken(tick: datetime) -> Job:
        raise RuntimeError("no report today")

    schedules = [
        CronSchedule("*/2 * * * * *", broken, name="broken"),
        CronSchedule("*/2 * * * * *", Purge),
    ]
    a = CronScheduler(
        "app",
        schedules,
        store,
        published,
        CronSettings(lease_s=3, grace_s=10),
        "a",
        per_process=True,
        now=clock.now,
        monotonic=clock.monotonic,
    )
    await a.turn()
    clock.advance(2)
    assert await a.turn() == 1.0  # the broken one is tried again within a second
    assert [name for name, _, _ in a.published] == ["test.cron.purge"]


async def test_missed_ticks_are_skipped_by_default() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("* * * * *", Purge)  # every minute
    a = scheduler(schedule, store, clock, published, "a")
    await turn_all([a], clock, 60)
    assert [tick.minute for _, tick, _ in a.published] == [1]
    clock.advance(3600 + 5)  # every replica was down for an hour; back 5 s after 11:01
    await turn_all([a], clock, 60)
    # 10:02 to 11:00 are skipped; 11:01 is 5 s late, within the grace: published
    assert [(tick.hour, tick.minute) for _, tick, _ in a.published] == [
        (10, 1),
        (11, 1),
        (11, 2),
    ]
    assert len(published.ids) == 3


async def test_catch_up_publishes_the_newest_missed_ticks_once() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("* * * * *", Purge, catch_up=3)
    a = scheduler(schedule, store, clock, published, "a")
    await turn_all([a], clock, 60)
    clock.advance(600 + 5)  # back 5 s after 10:11 (on time): 10:02 to 10:10 missed
    await a.turn()
    assert [tick.minute for _, tick, _ in a.published] == [1, 8, 9, 10, 11]
    assert len(published.ids) == 5
    # Another replica that takes over later publishes none of them again (the markers).
    b = scheduler(schedule, store, clock, published, "b")
    clock.advance(4)
    await b.turn()
    clock.advance(4)
    await b.turn()
    assert b.leadership.leading
    assert len(published.ids) == 5


async def test_catch_up_reaches_back_no_further_than_the_store_remembers() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("0 * * * *", Purge, catch_up=10)  # hourly
    a = CronScheduler(
        "app",
        [schedule],
        store,
        published,
        CronSettings(lease_s=3, grace_s=10),
        "a",
        retention_s=4 * 3600,
        per_process=True,
        now=clock.now,
        monotonic=clock.monotonic,
    )
    await a.turn()
    clock.advance(24 * 3600)  # a day down: 24 missed ticks, catch_up 10
    await a.turn()
    assert [tick.hour for _, tick, _ in a.published] == [7, 8, 9, 10]  # 4 hours back at most


async def test_a_new_schedule_does_not_catch_up_its_past() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("0 * * * *", Purge, catch_up=5)  # hourly
    a = scheduler(schedule, store, clock, published, "a")
    await a.turn()
    assert published.ids == []
    clock.advance(3600)
    await a.turn()
    assert len(published.ids) == 1, "the tick of 11:00, on time"


async def test_a_new_schedule_in_a_shared_store_publishes_the_ticks_of_its_grace() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge, catch_up=3)
    a = CronScheduler(
        "app",
        [schedule],
        store,
        published,
        CronSettings(lease_s=3, grace_s=10),
        "a",
        now=clock.now,
        monotonic=clock.monotonic,
    )
    await a.turn()
    # 09:59:52 to 10:00:00 are within the 10 s grace; 09:59:46-50 (catch-up) are not run
    assert [tick.second for _, tick, _ in a.published] == [52, 54, 56, 58, 0]
    b = CronScheduler(
        "app",
        [schedule],
        store,
        published,
        CronSettings(lease_s=3, grace_s=10),
        "b",
        now=clock.now,
        monotonic=clock.monotonic,
    )
    await a.resign()
    await b.turn()
    assert b.leadership.leading
    assert len(published.ids) == 5, "the next leader finds them all published"


async def test_a_leader_that_stops_gracefully_hands_over_at_once() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    await a.turn()
    await b.turn()
    assert a.leadership.leading
    await a.resign()
    await b.turn()
    assert b.leadership.leading


async def test_a_leader_that_cannot_renew_for_a_lease_stops_leading() -> None:
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    a = scheduler(CronSchedule("*/2 * * * * *", Purge), store, clock, published, "a")
    await a.turn()
    assert a.leadership.leading
    clock.advance(3)  # no turn for a whole lease (paused, or the store away)
    assert not a.leadership.leading


# -- review of the first version (each test failed before its fix) -----------------------


class HookedStore(MemoryIdempotencyStore):
    """A memory store that runs `hook(key, token)` once, inside a claim, after the store
    took it: what happens meanwhile happens while the answer is on its way back (or while
    the claiming replica is paused right after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Callable[[str, str], Awaitable[None]] | None = None

    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
        state = await super().claim(key, token, lease_s)
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook(key, token)
        return state


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # fall back: 03:00 CEST becomes 02:00 CET, 02:30 comes twice and runs once
        (datetime(2026, 10, 25, 0, 0, 0, 500_000, tzinfo=UTC), [datetime(2026, 10, 25, 0, 30)]),
        # spring forward: 02:00 CET becomes 03:00 CEST, 02:30 runs right after the change
        (datetime(2026, 3, 29, 0, 0, 0, 500_000, tzinfo=UTC), [datetime(2026, 3, 29, 1, 0)]),
    ],
)
async def test_a_tick_at_a_daylight_saving_change_runs_once_and_nothing_spins(
    start: datetime, expected: list[datetime]
) -> None:
    """Bug: from a time in the repeated hour, cronsim gave the tick of the hour's first
    pass (already past) as the next one: the scheduler turned without waiting for that
    hour, and published the tick again once its marker had expired."""
    clock, store, published = Clock(start), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("30 2 * * *", Purge, tz="Europe/Paris")
    a = scheduler(schedule, store, clock, published, "a")
    waits = []
    for _ in range(3 * 3600):
        clock.advance(1)
        waits.append(await a.turn())
        assert schedule.next_tick(clock.now()) > clock.now()  # type: ignore[operator]
    assert min(waits) > 0, "a turn that does not wait spins"
    assert [tick for _, tick, _ in a.published] == [t.replace(tzinfo=UTC) for t in expected]
    assert len(published.ids) == 1


async def test_a_leader_paused_before_its_publish_past_its_lease_publishes_nothing() -> None:
    """Bug: the lease was checked before the marker's claim, not after it: a leader
    paused once its claim was taken (SIGSTOP, a slow answer) published, when it resumed,
    a tick its successor had published meanwhile (the successor publishes a tick whose
    marker is claimed but not complete: its claimer may have died)."""
    clock, store, published = Clock(), HookedStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    await turn_all([a, b], clock, 1.25)  # 10:00:01.75
    assert a.leadership.leading

    async def paused(key: str, token: str) -> None:  # `a` claims the marker of 10:00:02
        assert (token, key) == ("a", "cron:app:test.cron.purge:2026-11-30T10:00:02+00:00")
        await turn_all([b], clock, 10)  # `b` takes over and publishes 10:00:02 to 10:00:12

    store.hook = paused
    clock.advance(0.25)
    await a.turn()
    assert b.leadership.leading
    assert not a.leadership.leading
    assert published.ids == tick_ids(schedule, START, clock.now()), "each tick once"
    assert [tick for _, tick, _ in a.published] == []


async def test_a_replica_takes_over_a_whole_lease_after_it_read_the_leaders_stamp() -> None:
    """Bug: a replica dated the stamp it read from before its claim, so a renewal written
    during that claim was taken as older than it was, and the replica took the lease
    over while its leader still led, by its own clock."""
    clock, store, published = Clock(), HookedStore(), Published()
    schedule = CronSchedule("*/2 * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a")
    b = scheduler(schedule, store, clock, published, "b")
    await a.turn()
    await b.turn()
    assert a.leadership.leading
    clock.advance(1)  # `a` is due to renew

    async def renewed_meanwhile(key: str, token: str) -> None:
        assert (token, key) == ("b", "cron:app:leader")
        clock.advance(0.5)
        assert await a.leadership.refresh()  # then `a` is paused, and renews no more

    store.hook = renewed_meanwhile
    await b.turn()
    for _ in range(40):
        clock.advance(0.25)
        await b.turn()
        if b.leadership.leading:
            break
    assert b.leadership.leading
    assert not a.leadership.leading, "two leaders at once"


async def test_a_turn_looks_at_a_bounded_number_of_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: a turn listed every tick of the grace before keeping the newest 1,000 (86,400
    for a seconds schedule with a grace of a day: 0.4 s of the event loop, every turn)."""
    steps = 0

    class CountingCronSim(cronsim.CronSim):
        def __next__(self) -> datetime:
            nonlocal steps
            steps += 1
            return super().__next__()

    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()
    schedule = CronSchedule("* * * * * *", Purge)
    a = scheduler(schedule, store, clock, published, "a", CronSettings(grace_s=86_400))
    await a.turn()
    clock.advance(1)
    monkeypatch.setattr(cron_module, "CronSim", CountingCronSim)
    await a.turn()
    assert len(published.ids) == 1
    assert steps <= MAX_TICKS_PER_TURN + 10


async def test_a_store_that_is_away_neither_stops_the_scheduler_nor_makes_it_spin() -> None:
    calls = 0

    class AwayStore(MemoryIdempotencyStore):
        async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
            nonlocal calls
            calls += 1
            raise ConnectionError("the store is away")

    a = CronScheduler(
        "app",
        [CronSchedule("* * * * * *", Purge)],
        AwayStore(),
        Published(),
        CronSettings(lease_s=3, grace_s=10),
        "a",
    )
    stopping = asyncio.Event()
    task = asyncio.create_task(a.run(stopping))
    await asyncio.sleep(2.5)
    assert not task.done()
    stopping.set()
    await asyncio.wait_for(task, 1)
    assert 2 <= calls <= 4, "retried about every second"


class OwnBaseError(BaseException):
    pass


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt(), OwnBaseError("x")])
async def test_a_job_function_that_raises_a_base_exception_stops_no_scheduler(
    raised: BaseException,
) -> None:
    """Bug: a job function's `BaseException` went through `turn()` and `run()` (which
    catch `Exception`): the scheduler task ended, silently, on every replica in turn."""
    clock, store, published = Clock(), MemoryIdempotencyStore(), Published()

    def broken(tick: datetime) -> Job:
        raise raised

    a = CronScheduler(
        "app",
        [
            CronSchedule("*/2 * * * * *", broken, name="broken"),
            CronSchedule("*/2 * * * * *", Purge),
        ],
        store,
        published,
        CronSettings(lease_s=3, grace_s=10),
        "a",
        per_process=True,
        now=clock.now,
        monotonic=clock.monotonic,
    )
    await a.turn()
    clock.advance(2)
    assert await a.turn() == 1.0
    assert [name for name, _, _ in a.published] == ["test.cron.purge"]


# -- real workers over the memory broker ----------------------------------------------------


class Every(Job, type="test.cron.every", version=1):
    pass


def every_second_app(runs: list[tuple[str, str]]) -> App:
    app = App("cron-e2e")

    @app.cron("* * * * * *")
    @app.handler(Every)
    async def every(job: Every, ctx: JobContext) -> None:
        runs.append((ctx.job_id, ctx.attributes.subject or ""))

    return app


@pytest.mark.slow
async def test_workers_run_each_tick_once_and_survive_a_crashed_leader() -> None:
    runs: list[tuple[str, str]] = []
    settings = Settings.model_construct(
        cron=CronSettings(lease_s=0.6, grace_s=3), create_missing=True
    )
    async with TestApp(every_second_app(runs), settings, workers=3) as t:
        await asyncio.sleep(2.6)
        leaders = [i for i, w in enumerate(t.workers) if w.cron and w.cron.leadership.leading]
        assert len(leaders) == 1
        await t.crash(leaders[0])
        await asyncio.sleep(3.5)
        await t.drain()
    subjects = [subject for _, subject in runs]
    ticks = sorted(datetime.fromisoformat(s.rsplit("/", 1)[1]) for s in subjects)
    assert len(set(subjects)) == len(subjects), f"a tick ran twice: {subjects}"
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)]
    assert gaps == [1.0] * len(gaps), f"a tick was lost: {ticks}"
    assert len(ticks) >= 5


async def test_open_worker_gives_the_scheduler_a_producer_on_the_backends_broker() -> None:
    """`open_worker` (what `jobstream worker` runs) publishes ticks through the backend's
    own publisher: here a memory backend with a broker of its own."""
    runs: list[tuple[str, str]] = []
    broker = MemoryBroker()
    settings = Settings.model_validate(
        {
            "transport": "memory",
            "create_missing": True,
            "cron": {"lease_s": 0.5, "grace_s": 2},
            "worker": {"group": "cron", "commit_interval_s": 0.02},
        }
    )
    app = every_second_app(runs)
    async with open_worker(app, settings, backend=MemoryBackend(broker)) as worker:
        task = asyncio.create_task(worker.run())
        assert await broker.wait_until(lambda: len(runs) >= 2, 5)
        worker.stop()
        await task
    assert worker.cron is not None
    assert [job_id for job_id, _ in runs] == [job_id for _, _, job_id in worker.cron.published]
