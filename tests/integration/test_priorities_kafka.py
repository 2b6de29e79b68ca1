"""Job priorities (issue 15) on a real Kafka: one topic per level, weighted fetching.

- A high job published behind 10,000 queued low jobs, while the worker is full of them
  (`max_in_flight` 64, a handler of 5 ms), starts within 1 s of its publish.
- With a backlog at every level, 3,000 jobs in a row run in the configured shares (6/3/1)
  within 10%.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from consumer import App, JobContext, Settings
from producer import DestinationMissing
from schemas import Job
from tests.support import publish_raw, routed_topic, running_worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WEIGHTS = {"high": 6, "normal": 3, "low": 1}


class Prio(Job, type="test.priorities.kafka", version=1, register=False):
    level: str
    n: int


class Starts:
    """Records each job's level and the time it started, in start order."""

    def __init__(self, work_s: float) -> None:
        self.app = App("priorities")
        self.order: list[tuple[str, int, float]] = []
        self.work_s = work_s
        self.app.handler(Prio)(self.handle)

    async def handle(self, job: Prio, ctx: JobContext) -> None:
        self.order.append((job.level, job.n, time.time()))
        await asyncio.sleep(self.work_s)

    def started(self, level: str, n: int) -> float | None:
        return next((t for lv, m, t in self.order if (lv, m) == (level, n)), None)


async def level_topics(new_topic, partitions: int = 3) -> dict[str, str]:
    """The normal topic (with its tiers and dead-letter topic) and its two level topics."""
    topic = await routed_topic(new_topic, partitions=partitions)
    for level in ("high", "low"):
        await new_topic(partitions=partitions, name=f"{topic}.priority-{level}")
    return {
        "high": f"{topic}.priority-high",
        "normal": topic,
        "low": f"{topic}.priority-low",
    }


def settings(group: str, monkeypatch: pytest.MonkeyPatch, topic: str, **worker: object) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.priorities.kafka": topic}))
    monkeypatch.setenv("JOBSTREAM_ROUTING__PRIORITIES", "true")
    return Settings(
        retry={"tiers_s": [0.5, 2.0]},
        worker={"group": group, "commit_interval_s": 0.2, **worker},
    )


@pytest.mark.timeout(180)
async def test_a_high_job_starts_within_a_second_behind_10000_low_jobs(
    new_topic, group_id, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = await level_topics(new_topic)
    config = settings(group_id, monkeypatch, topics["normal"])
    assert config.worker.max_in_flight == 64
    starts = Starts(work_s=0.005)
    await publish_raw(topics["low"], [(None, Prio(level="low", n=n)) for n in range(10_000)])
    async with running_worker(starts.app, config):
        await wait_until(lambda: len(starts.order) >= 500, 60, "500 low jobs started")
        published = time.time()
        await publish_raw(topics["high"], [(None, Prio(level="high", n=0))])
        queued = 10_000 - len(starts.order)
        await wait_until(lambda: starts.started("high", 0) is not None, 30, "the high job")
        started = starts.started("high", 0)
        assert started is not None
        ran_before = sum(1 for lv, _, t in starts.order if lv == "low" and t < started)
        await wait_until(lambda: len(starts.order) == 10_001, 120, "every job")
    delay = started - published
    print(f"high job started {delay:.3f}s after its publish, {queued} low jobs still queued")
    assert queued >= 5_000, "the high job was published behind a real backlog"
    assert delay < 1.0, f"the high job started {delay:.3f}s after it was published"
    assert ran_before < 10_000 - 5_000, "it overtook the low backlog"
    assert Counter(lv for lv, _, _ in starts.order) == {"low": 10_000, "high": 1}


@pytest.mark.timeout(180)
async def test_saturated_levels_run_in_the_configured_shares(
    new_topic, group_id, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts 1,000 to 4,000 (after the first fetches, while every level still has a
    backlog: high, the fastest drained, has 1,600 left at the end of the window)."""
    topics = await level_topics(new_topic)
    config = settings(group_id, monkeypatch, topics["normal"], priority_weights=WEIGHTS)
    starts = Starts(work_s=0.002)
    per_level = 4_000
    for level, topic in topics.items():
        await publish_raw(topic, [(None, Prio(level=level, n=n)) for n in range(per_level)])
    async with running_worker(starts.app, config):
        await wait_until(lambda: len(starts.order) >= 4_000, 60, "4,000 jobs started")
        window = Counter(lv for lv, _, _ in starts.order[1_000:4_000])
        await wait_until(lambda: len(starts.order) == 3 * per_level, 120, "every job")
    total = sum(WEIGHTS.values())
    print(f"starts 1,000 to 4,000: {dict(window)} (weights {WEIGHTS})")
    for level, weight in WEIGHTS.items():
        expected = 3_000 * weight / total
        assert abs(window[level] - expected) <= 0.1 * expected, (level, window)
    assert Counter(lv for lv, _, _ in starts.order) == dict.fromkeys(WEIGHTS, per_level)


async def test_a_worker_without_its_level_topics_refuses_to_start_naming_them(
    new_topic, group_id, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Priorities turned on without `topics ensure`: before, the worker ran, never read
    the level topics, and aiokafka printed "not found in cluster metadata"; now it
    refuses to start, naming them, as for a missing retry or dead-letter topic."""
    topic = await routed_topic(new_topic)
    config = settings(group_id, monkeypatch, topic)
    with pytest.raises(DestinationMissing) as refused:
        async with running_worker(Starts(0).app, config):
            pass
    assert f"{topic}.priority-high" in str(refused.value)
    assert f"{topic}.priority-low" in str(refused.value)
