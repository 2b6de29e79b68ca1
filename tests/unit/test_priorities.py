"""Job priorities (issue 15) on the memory backend, which reads the levels as Kafka does:
the weighted turn (`consumer.runtime.PriorityLevels`), then real workers (`TestApp`) with
backlogs at every level: the shares match the weights, a high job overtakes a low backlog,
low jobs are not starved, retries and dead letters of any level go to the normal topic's
tiers and dead-letter topic, and without `routing.priorities` nothing changes."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from consumer import App, DeadLetter, JobContext, Retry
from consumer.core import Outcome, Settings, main_destinations
from consumer.memory import MemoryBackend, TestApp
from consumer.runtime import PriorityLevels
from producer import PRIORITIES, JobProducer, Priority, PublishRequest
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import Job

TOPIC = "jobs.test.prio"
TIERS = [0.2, 1.0]


class Prio(Job, type="test.prio", version=1):
    level: str
    n: int
    fail: str = ""


class Starts:
    """An app whose handler records the level of each job it starts, in start order."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.app = App("priorities-test")
        self.order: list[tuple[str, int]] = []
        self.attempts: dict[str, list[int]] = {}
        self.hold = hold
        self.app.handler(Prio)(self.handle)

    async def handle(self, job: Prio, ctx: JobContext) -> None:
        self.order.append((job.level, job.n))
        self.attempts.setdefault(ctx.job_id, []).append(ctx.attempt)
        if self.hold is not None:
            await self.hold.wait()
        if job.fail == "retry" and ctx.attempt == 1:
            raise Retry(delay_s=0.1)
        if job.fail == "dead":
            raise DeadLetter("for good")

    def levels(self, first: int) -> Counter[str]:
        return Counter(level for level, _ in self.order[:first])


def settings(priorities: bool = True, **worker: Any) -> Settings:
    values = {
        "transport": "memory",
        "routing": {"priorities": priorities, "routes": {"test.prio": TOPIC}, "partitions": 3},
        "worker": {"commit_interval_s": 0.02, "ordering": "none", **worker},
        "retry": {"tiers_s": TIERS},
    }
    return Settings.model_validate(values)


async def backlog(broker: MemoryBroker, config: Settings, jobs: dict[Priority, int]) -> None:
    """Provision the topics and publish `jobs` (count per level) before any worker runs."""
    await MemoryBackend(broker).provision(config, ["test.prio"])
    producer = JobProducer(config, publisher=MemoryPublisher(broker, partitions=3))
    await producer.start()
    requests = [
        PublishRequest(Prio(level=level, n=n), priority=level)
        for level, count in jobs.items()
        for n in range(count)
    ]
    await producer.publish_many(requests)
    await producer.stop()


# -- the weighted turn -------------------------------------------------------------------


def test_every_ten_picks_of_saturated_levels_follow_the_weights_spread_out() -> None:
    levels = PriorityLevels(settings(), [TOPIC])
    picks = [levels.pick([True, True, True]) for _ in range(1000)]
    for window in range(0, 1000, 10):
        assert Counter(picks[window : window + 10]) == {0: 6, 1: 3, 2: 1}
    longest_high_run = max(len(run) for run in "".join(map(str, picks)).split("1"))
    assert longest_high_run <= 4, "high picks are interleaved, not six in a row"


def test_an_idle_level_is_skipped_and_picked_at_its_first_turn_back() -> None:
    levels = PriorityLevels(settings(), [TOPIC])
    assert [levels.pick([False, False, True]) for _ in range(5)] == [2] * 5
    assert levels.pick([False, False, False]) is None
    for _ in range(50):  # whatever credit normal and low hold, high comes first
        levels.pick([False, True, True])
        assert levels.pick([True, True, True]) == 0
        levels.pick([False, True, True])


def test_levels_of_topics_tiers_count_as_normal() -> None:
    config = settings()
    topics = [f"{TOPIC}.priority-high", TOPIC, f"{TOPIC}.priority-low", f"{TOPIC}.retry.1"]
    levels = PriorityLevels(config, topics)
    assert levels.count == 3
    assert [levels.of[t] for t in topics] == [0, 1, 2, 1]
    assert PRIORITIES == ("high", "normal", "low")


def test_custom_weights_are_followed() -> None:
    config = settings(priority_weights={"high": 2, "low": 5})  # normal left out: its 3
    levels = PriorityLevels(config, [TOPIC])
    assert Counter(levels.pick([True, True, True]) for _ in range(80)) == {0: 16, 1: 24, 2: 40}


# -- workers on the memory broker --------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 64])
async def test_saturated_levels_run_in_the_configured_shares(max_in_flight: int) -> None:
    broker = MemoryBroker()
    config = settings(max_in_flight=max_in_flight)
    await backlog(broker, config, {"high": 1200, "normal": 1200, "low": 1200})
    starts = Starts()
    async with TestApp(starts.app, config, broker=broker) as t:
        await t.drain(timeout_s=60)
    assert len(starts.order) == 3600
    first = starts.levels(1000)  # every level still has a backlog
    if max_in_flight == 1:
        assert first == {"high": 600, "normal": 300, "low": 100}
    else:
        for level, share in {"high": 0.6, "normal": 0.3, "low": 0.1}.items():
            assert abs(first[level] / 1000 - share) <= 0.1 * share, first
    # Each level in publish order: the levels are FIFOs, the weighting only interleaves.
    for level in PRIORITIES:
        seen = [n for lv, n in starts.order if lv == level]
        assert sorted(seen) == list(range(1200))


async def test_low_jobs_are_not_starved_by_high_and_normal_backlogs() -> None:
    broker = MemoryBroker()
    config = settings(max_in_flight=4, priority_weights={"high": 1000, "normal": 1000})
    await backlog(broker, config, {"high": 3000, "normal": 3000, "low": 5})
    starts = Starts()
    async with TestApp(starts.app, config, broker=broker) as t:
        await t.drain(timeout_s=60)
    lows = [i for i, (level, _) in enumerate(starts.order) if level == "low"]
    assert len(lows) == 5
    assert lows[0] < 2001 + 4, "the first low job runs within one round of the weights"
    assert lows[-1] < 5 * 2001 + 4, "each low job gets its turn while the others are busy"


async def test_a_high_job_overtakes_a_low_backlog() -> None:
    broker = MemoryBroker()
    config = settings(max_in_flight=8)
    await backlog(broker, config, {"low": 3000})
    release = asyncio.Event()
    starts = Starts(hold=release)
    async with TestApp(starts.app, config, broker=broker) as t:
        # the worker is full of low jobs, and holds more low ones in hand
        await broker.wait_until(lambda: len(starts.order) == 8, 5)
        await t.publish(Prio(level="high", n=0), priority="high")
        release.set()
        await broker.wait_until(lambda: ("high", 0) in starts.order, 5)
        position = starts.order.index(("high", 0))
        await t.drain(timeout_s=60)
    # at most one hand of low jobs (max_in_flight) was admitted before it was read
    assert 8 <= position <= 8 + 8, f"the high job started as job {position} of 3001"
    assert len(starts.order) == 3001


async def test_retries_delays_and_dead_letters_of_every_level_use_the_normal_topics() -> None:
    config = settings()
    starts = Starts()
    async with TestApp(starts.app, config) as t:
        retried = await t.publish(Prio(level="high", n=1, fail="retry"), priority="high")
        dead = await t.publish(Prio(level="low", n=2, fail="dead"), priority="low")
        delayed = await t.publish(Prio(level="high", n=3), priority="high", delay=0.5)
        await t.drain(timeout_s=10)
        topics = set(t.broker.topics())
        letters = t.dead_letters()
    assert [(s.attempt, s.topic, s.outcome) for s in t.settlements(retried.job_id)] == [
        (1, f"{TOPIC}.priority-high", Outcome.RETRYING),
        (2, f"{TOPIC}.retry.1", Outcome.COMPLETED),
    ]
    assert [(s.topic, s.outcome) for s in t.settlements(dead.job_id)] == [
        (f"{TOPIC}.priority-low", Outcome.DEAD_LETTERED)
    ]
    assert [(dl.topic, dl.job_id) for dl in letters] == [(f"{TOPIC}.dlq", dead.job_id)]
    # the delayed high job waited in the normal topic's tier, and ran there as attempt 1
    assert [(s.attempt, s.topic) for s in t.settlements(delayed.job_id)] == [
        (1, f"{TOPIC}.retry.1")
    ]
    assert starts.attempts[delayed.job_id] == [1]
    level_topics = {f"{TOPIC}.priority-high", f"{TOPIC}.priority-low"}
    assert level_topics <= topics
    assert not [t for t in topics if t.startswith(f"{TOPIC}.priority-") and t not in level_topics]


async def test_without_priorities_nothing_changes() -> None:
    config = settings(priorities=False, max_in_flight=1)
    assert main_destinations(Starts().app, config) == [TOPIC]
    assert PriorityLevels(config, [TOPIC, f"{TOPIC}.retry.1"]).count == 1
    starts = Starts()
    async with TestApp(starts.app, config) as t:
        with pytest.raises(ValueError, match=r"routing\.priorities"):
            await t.publish(Prio(level="high", n=0), priority="high")
        for n in range(30):
            await t.publish(Prio(level="normal", n=n), key="one-key")
        await t.drain()
        topics = t.broker.topics()
    assert [n for _, n in starts.order] == list(range(30))
    assert not [topic for topic in topics if ".priority-" in topic]


@pytest.mark.parametrize(
    "weights", ['{"high": 0}', '{"high": "6"}', '{"high": true}', '{"urgent": 3}']
)
def test_a_weight_that_is_not_an_integer_from_1_to_1000_of_a_level_is_refused(
    weights: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_WORKER__PRIORITY_WEIGHTS", weights)
    with pytest.raises(ValidationError, match="priority_weights"):
        Settings()
