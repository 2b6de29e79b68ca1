"""Delayed jobs (`not_before`, issue 15) on the memory backend, which routes them as Kafka
does: the plan (`consumer.core.plan_delay`), then real workers (`TestApp`) with exact
identities and start times: never before `not_before`, soon after it, in any publish
order, on the first attempt, and no job held behind one due later."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumer import App, JobContext, Retry
from consumer.core import (
    MAX_DELAY_S,
    DeadLetterFilter,
    DelayTooLong,
    Delivery,
    Outcome,
    Settings,
    plan_delay,
)
from consumer.memory import TestApp
from consumer.nats._schedules import Schedules
from producer import PublishError, Receipt
from schemas import Job, encode, from_nats, to_nats

TIERS = [0.2, 0.5, 1.0]
LATE_S = 0.3  # the memory broker has no network: a start is late by scheduling noise only


class Delayed(Job, type="test.delayed", version=1):
    n: int


class Starts:
    """An app whose handler records when each job started (time.time()) and its attempt."""

    def __init__(self) -> None:
        self.app = App("delayed-test")
        self.started: dict[str, list[tuple[float, int]]] = {}
        self.app.handler(Delayed)(self.handle)

    async def handle(self, job: Delayed, ctx: JobContext) -> None:
        self.started.setdefault(ctx.job_id, []).append((time.time(), ctx.attempt))


def settings(**retry: Any) -> Settings:
    values = {"worker": {"commit_interval_s": 0.02}, "retry": {"tiers_s": TIERS, **retry}}
    return Settings.model_validate({"transport": "memory", **values})


def in_(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def lateness(starts: Starts, job_id: str, not_before: datetime) -> float:
    [(started, attempt)] = starts.started[job_id]
    assert attempt == 1, f"{job_id} ran as attempt {attempt}"
    return started - not_before.timestamp()


# -- the plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "released_in", "expected"),
    [
        (0.0, None, ("run", 0)),
        (-5.0, 3.0, ("run", 0)),
        (0.1, None, ("hold", 0)),  # under the first tier: the last stretch, in memory
        (0.5, None, ("move", 1)),  # the largest tier at most the remaining time
        (0.99, None, ("move", 1)),
        (86400.0, None, ("move", 2)),
        (MAX_DELAY_S + 1, None, ("too-long", 0)),
        (MAX_DELAY_S + 1, 0.0, ("move", 2)),  # only a main-topic record is checked
        (5.0, 0.4, ("wait", 0)),  # a tier record not released yet waits in its partition
        (0.1, 0.4, ("wait", 0)),
        (0.3, -0.1, ("move", 0)),  # released before due: on to a shorter tier
        (0.1, -0.1, ("hold", 0)),
    ],
)
def test_the_plan_of_a_record_due_later(
    remaining: float, released_in: float | None, expected: tuple[str, int]
) -> None:
    plan = plan_delay(remaining, TIERS, released_in=released_in)
    assert (plan.action, plan.tier) == expected
    if plan.action == "wait":
        assert plan.seconds == min(remaining, released_in or 0)


def test_without_tiers_every_delay_is_held_in_memory() -> None:
    assert plan_delay(3600.0, []).action == "hold"


# -- on workers --------------------------------------------------------------------------


async def test_a_delayed_job_starts_at_its_not_before_as_its_first_attempt() -> None:
    starts = Starts()
    async with TestApp(starts.app, settings()) as t:
        not_before = in_(1.6)  # 1.0 s tier, then 0.5 s tier, then the last 0.1 s in memory
        receipt = await t.publish(Delayed(n=1), not_before=not_before)
        await t.drain(timeout_s=10)
        late = lateness(starts, receipt.job_id, not_before)
        assert 0 <= late <= LATE_S, f"started {late:+.3f}s after not_before"
        [settled] = t.settlements(receipt.job_id)
        assert (settled.attempt, settled.outcome) == (1, Outcome.COMPLETED)
        # Moved through the tiers unchanged: same job id, attempt 1, same due time.
        copies = [
            dict(record.headers)
            for tier in (f"jobs.test.delayed.retry.{n}" for n in (1, 2, 3))
            for partition in range(t.broker.partitions(tier))
            for record in t.broker.read(tier, partition, 0, 100)
        ]
        assert 1 <= len(copies) <= 3, copies
        assert {(c["ce_id"], c["ce_jobattempt"]) for c in copies} == {
            (receipt.job_id.encode(), b"1")
        }
        assert len({c["ce_jobnotbefore"] for c in copies}) == 1


async def test_a_job_due_soon_is_not_held_behind_one_due_later_on_its_partition() -> None:
    starts = Starts()
    async with TestApp(starts.app, settings()) as t:
        # One key, so one partition: the later job is published first.
        later_due, soon_due = in_(3.0), in_(0.7)
        later = await t.publish(Delayed(n=1), key="k", not_before=later_due)
        soon = await t.publish(Delayed(n=2), key="k", not_before=soon_due)
        await t.drain(timeout_s=10)
        assert 0 <= lateness(starts, soon.job_id, soon_due) <= LATE_S
        assert 0 <= lateness(starts, later.job_id, later_due) <= LATE_S
        assert starts.started[soon.job_id][0][0] < starts.started[later.job_id][0][0]


async def test_two_hundred_random_delays_each_start_in_their_window_in_any_order() -> None:
    starts = Starts()
    rng = random.Random(15)
    async with TestApp(starts.app, settings(), workers=2) as t:
        due = [in_(rng.uniform(0.0, 3.0)) for _ in range(200)]
        rng.shuffle(due)  # publish order unrelated to due order
        receipts = [
            await t.publish(Delayed(n=n), key=f"k{n % 7}", not_before=d) for n, d in enumerate(due)
        ]
        await t.drain(timeout_s=20)
        assert set(starts.started) == {r.job_id for r in receipts}
        late = [lateness(starts, r.job_id, d) for r, d in zip(receipts, due, strict=True)]
        assert min(late) >= 0, f"a job started {min(late):.3f}s early"
        assert max(late) <= LATE_S, f"a job started {max(late):.3f}s late"
        assert [s.attempt for s in t.settlements()] == [1] * 200


async def test_a_job_due_beyond_the_maximum_delay_is_dead_lettered_not_run() -> None:
    starts = Starts()
    async with TestApp(starts.app, settings()) as t:
        receipt = await t.publish(Delayed(n=1), not_before=in_(MAX_DELAY_S + 3600))
        ok = await t.publish(Delayed(n=2))
        await t.drain(timeout_s=10)
        [letter] = t.dead_letters(DeadLetterFilter())
        assert (letter.job_id, letter.reason) == (receipt.job_id, "delay-too-long")
        assert list(starts.started) == [ok.job_id]


async def test_with_in_place_retries_a_delayed_job_waits_in_memory() -> None:
    starts = Starts()
    async with TestApp(starts.app, settings(in_place=True)) as t:
        not_before = in_(1.2)
        receipt = await t.publish(Delayed(n=1), not_before=not_before)
        other = await t.publish(Delayed(n=2))
        await asyncio.sleep(0.3)
        assert list(starts.started) == [other.job_id], "the other job is not held behind it"
        await t.drain(timeout_s=10)
        assert 0 <= lateness(starts, receipt.job_id, not_before) <= LATE_S


# -- NATS: the schedule message (no server: what is published, and when the ack comes) ----


class Scheduled:
    """The callbacks `Schedules` is given: what it publishes, settles and naks."""

    def __init__(self, refuse: bool = False) -> None:
        self.published: list[tuple[str, dict[str, str], bytes]] = []
        self.settled: list[tuple[int, Outcome]] = []
        self.naks: list[tuple[int, float]] = []
        self.refuse = refuse

    async def publish(self, subject: str, headers: dict[str, str], body: bytes) -> Receipt:
        if self.refuse:
            raise PublishError("nats refused: message schedules is disabled")
        self.published.append((subject, headers, body))
        return Receipt(headers["Nats-Msg-Id"], "nats", "JOBS", None, 9)

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.settled.append((delivery.offset, outcome))

    async def nak(self, delivery: Delivery, delay_s: float) -> bool:
        self.naks.append((delivery.offset, delay_s))
        return True

    def schedules(self, **routing: Any) -> Schedules:
        s = Settings.model_validate({"transport": "nats", "routing": routing})
        found = Schedules(s, lambda d: "jobs.test.delayed", self.settle, self.nak)
        found.publish_with(self.publish)
        return found


def nats_delivery(not_before: datetime | None, **extra: str) -> Delivery:
    message = encode(Delayed(n=1), source="/t", not_before=not_before)
    headers = {**to_nats(message.attributes), "Nats-Msg-Id": message.attributes.id, **extra}
    return Delivery(
        partition="g",
        offset=41,
        topic="jobs.test.delayed.3",
        attributes=from_nats(headers),
        body=message.body,
        raw_headers=[(name, value.encode()) for name, value in headers.items()],
    )


async def test_nats_a_delayed_job_is_scheduled_and_acked_after_the_pub_ack() -> None:
    calls = Scheduled()
    schedules = calls.schedules()
    due = in_(3600).replace(microsecond=123_400)
    delivery = nats_delivery(due)
    assert schedules.take(delivery) is None, "not handed out"
    await schedules.drain(5)
    [(subject, headers, body)] = calls.published
    assert subject == "jobs.test.delayed._scheduled.41"
    at = due.replace(microsecond=124_000).isoformat(timespec="milliseconds")
    assert headers["Nats-Schedule"] == f"@at {at.replace('+00:00', 'Z')}", "rounded up"
    assert headers["Nats-Schedule-Target"] == "jobs.test.delayed.3"
    assert delivery.attributes is not None
    assert headers["Nats-Msg-Id"] == f"schedule:JOBS:41:{delivery.attributes.id}"
    assert headers["ce-jobnotbefore"] == dict(delivery.raw_headers)["ce-jobnotbefore"].decode()
    assert body == delivery.body
    assert calls.settled == [(41, Outcome.COMPLETED)], "acked once the schedule was stored"
    schedules.raise_if_failed()


async def test_nats_due_jobs_and_the_schedulers_copies_run_at_once() -> None:
    calls = Scheduled()
    schedules = calls.schedules()
    for delivery in (
        nats_delivery(None),
        nats_delivery(in_(-1)),
        nats_delivery(in_(3600), **{"Nats-Scheduler": "jobs.test.delayed._scheduled.40"}),
    ):
        assert schedules.take(delivery) is delivery
    assert calls.published == []


async def test_nats_a_delay_past_the_streams_retention_is_dead_lettered() -> None:
    calls = Scheduled()
    schedules = calls.schedules(stream_max_age_s=3600)
    assert schedules.limit_s == 3540
    handed = schedules.take(nats_delivery(in_(3600)))
    assert handed is not None
    assert handed.attributes is None
    assert isinstance(handed.error, DelayTooLong)
    assert calls.published == []


async def test_nats_a_stream_without_schedules_falls_back_to_a_delayed_nak() -> None:
    calls = Scheduled(refuse=True)
    schedules = calls.schedules()
    assert schedules.take(nats_delivery(in_(30))) is None
    await schedules.drain(5)
    [(offset, delay_s)] = calls.naks
    assert offset == 41
    assert 29 < delay_s <= 30
    assert calls.settled == []


async def test_a_retry_released_before_it_is_due_moves_to_a_shorter_tier_then_runs_on_time() -> (
    None
):
    app = App("retry-moves")
    failed: dict[str, float] = {}
    ran: dict[str, tuple[float, int]] = {}

    @app.handler(Delayed)
    async def handle(job: Delayed, ctx: JobContext) -> None:
        if ctx.attempt == 1:
            failed[ctx.job_id] = time.time()
            raise Retry(delay_s=1.6)  # past the last tier (1 s): lands there, released early
        ran[ctx.job_id] = (time.time(), ctx.attempt)

    async with TestApp(app, settings(policy={"jitter": 0})) as t:
        receipt = await t.publish(Delayed(n=1))
        await t.drain(timeout_s=10)
        started, attempt = ran[receipt.job_id]
        assert attempt == 2
        waited = started - failed[receipt.job_id]
        assert 1.6 <= waited <= 1.6 + LATE_S, f"retried after {waited:.3f}s"
        tiers = {
            tier: [dict(r.headers)["ce_jobattempt"] for r in t.broker.read(tier, p, 0, 10)]
            for tier in (f"jobs.test.delayed.retry.{n}" for n in (1, 2, 3))
            for p in range(t.broker.partitions(tier))
            if t.broker.read(tier, p, 0, 10)
        }
        # The last tier (1 s), then at its release 0.6 s remain: the 0.5 s tier, unchanged.
        assert tiers == {"jobs.test.delayed.retry.3": [b"2"], "jobs.test.delayed.retry.2": [b"2"]}
