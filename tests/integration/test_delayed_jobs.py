"""Delayed jobs (issue 15) on the real brokers: a job published with `not_before` starts no
earlier than it and at most 1 s after it, as its first attempt, in any publish order, and
a job due soon is never held behind one due later.

Kafka: the main-topic record is moved through the retry tiers (largest tier at most its
remaining time) and held in memory for its last stretch. NATS: JetStream's message
scheduler holds a copy (`Nats-Schedule: @at ...`). docs/scheduling.md says why.

The handler records each attempt's wall-clock start (`tests/apps/retry_timing.py`); the
assertions name job ids, attempts and lateness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import nats
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from consumer import Settings
from consumer.core import MAX_DELAY_S, DeadLetterFilter, DeadLetterRecord
from consumer.kafka import list_dead_letters
from consumer.nats import ensure_dead_letter_stream, list_nats_dead_letters, stream_destinations
from consumer.stores import JobState, open_status
from producer.nats import ensure_nats_stream
from schemas import encode, to_kafka, to_nats
from tests.apps.retry_timing import ATTEMPTS, TimedJob, app
from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL, REDIS_URL
from tests.support import running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIERS_S = [1.0, 5.0, 20.0]
WINDOW_S = 1.0  # the bound: at most 1 s after not_before

Publish = Callable[[Sequence[tuple[str | None, datetime]]], Awaitable[list[str]]]
DeadLetters = Callable[[], Awaitable[list[DeadLetterRecord]]]


@contextlib.asynccontextmanager
async def kafka_bus(
    new_topic, group_id, monkeypatch
) -> AsyncIterator[tuple[Settings, Publish, DeadLetters]]:
    topic = await new_topic(partitions=3)
    for suffix in [*(f".retry.{n}" for n in range(1, len(TIERS_S) + 1)), ".dlq"]:
        await new_topic(partitions=3, name=topic + suffix)
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.timed": topic}))
    settings = Settings(
        worker={"group": group_id, "commit_interval_s": 0.2}, retry={"tiers_s": TIERS_S}
    )

    async def publish(jobs: Sequence[tuple[str | None, datetime]]) -> list[str]:
        producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all", linger_ms=5)
        await producer.start()
        try:
            ids, sent = [], []
            for key, not_before in jobs:
                message = encode(
                    TimedJob(behaviour="ok"), source="/t", key=key, not_before=not_before
                )
                record_key, headers = to_kafka(message.attributes)
                sent.append(
                    await producer.send(topic, message.body, key=record_key, headers=headers)
                )
                ids.append(message.attributes.id)
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        return ids

    async def dead_letters() -> list[DeadLetterRecord]:
        return await list_dead_letters(settings, [topic + ".dlq"], DeadLetterFilter())

    yield settings, publish, dead_letters


@contextlib.asynccontextmanager
async def nats_bus() -> AsyncIterator[tuple[Settings, Publish, DeadLetters]]:
    stream = f"DJ_{uuid.uuid4().hex[:8]}".upper()
    prefix = stream.lower()
    subject = f"{prefix}.test.timed"
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": "delayed"},
    )
    client = await nats.connect(NATS_URL)
    js = client.jetstream()

    async def publish(jobs: Sequence[tuple[str | None, datetime]]) -> list[str]:
        ids, pending = [], []
        for key, not_before in jobs:
            message = encode(TimedJob(behaviour="ok"), source="/t", key=key, not_before=not_before)
            headers = to_nats(message.attributes)
            pending.append(await js.publish_async(subject, message.body, headers=headers))
            ids.append(message.attributes.id)
        await asyncio.gather(*pending)
        return ids

    async def dead_letters() -> list[DeadLetterRecord]:
        return await list_nats_dead_letters(settings, [], DeadLetterFilter())

    try:
        await ensure_nats_stream(js, stream_destinations(settings, [subject]), settings.routing)
        await ensure_dead_letter_stream(js, settings, [subject])
        yield settings, publish, dead_letters
    finally:
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        await client.close()


@pytest.fixture(params=["kafka", "nats"])
async def bus(
    request, new_topic, group_id, monkeypatch
) -> AsyncIterator[tuple[Settings, Publish, DeadLetters]]:
    if request.param == "kafka":
        async with kafka_bus(new_topic, group_id, monkeypatch) as found:
            yield found
    else:
        async with nats_bus() as found:
            yield found


def in_(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def started(job_ids: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(ATTEMPTS[job_id] for job_id in job_ids):
        waiting = sum(not ATTEMPTS[job_id] for job_id in job_ids)
        assert time.monotonic() < deadline, f"{waiting} jobs did not start in {timeout_s}s"
        await asyncio.sleep(0.1)


def lateness(job_id: str, not_before: datetime) -> float:
    """Seconds from `not_before` to the job's start; it ran once, as attempt 1."""
    attempts = ATTEMPTS[job_id]
    assert [a.attempt for a in attempts] == [1], f"{job_id}: attempts {attempts}"
    return attempts[0].at - not_before.timestamp()


async def test_a_delayed_job_starts_within_a_second_after_its_not_before(bus) -> None:
    settings, publish, _ = bus
    async with running_worker(app, settings) as worker:
        due = in_(7.5)  # Kafka: tier 5 s, tier 1 s (twice), then in memory
        [job_id] = await publish([("k", due)])
        await started([job_id], 30)
        await asyncio.sleep(0.5)  # a second run would show here
        assert not worker.stopped_by_fault
    late = lateness(job_id, due)
    assert 0 <= late <= WINDOW_S, f"started {late:+.3f}s after not_before"


async def test_a_delayed_job_is_shown_scheduled_by_the_worker_until_it_starts(bus) -> None:
    """Published without the ingress (nothing recorded it): the worker that set it aside
    (Kafka: moved to a tier; NATS: handed to the scheduler) records `scheduled` with its
    `not_before` in the shared status store (Redis), and the job still starts on time."""
    settings, publish, _ = bus
    namespace = f"scheduled-{uuid.uuid4().hex[:8]}"
    status = settings.status.model_copy(
        update={"backend": "redis", "url": SecretStr(REDIS_URL), "namespace": namespace}
    )
    settings = settings.model_copy(update={"status": status})
    store = await open_status(settings)
    try:
        async with running_worker(app, settings) as worker:
            due = in_(3.0)
            [job_id] = await publish([("k", due)])
            seen = None
            deadline = time.monotonic() + 2.0  # a fetch, then one 0.25 s round of writes
            while seen is None and time.monotonic() < deadline:
                seen = await store.get(job_id)
                await asyncio.sleep(0.05)
            await started([job_id], 30)
            assert not worker.stopped_by_fault
        final = await store.get(job_id)
    finally:
        await store.close()
    assert seen is not None, "not recorded as scheduled within 2 s of its publish"
    assert (seen.state, seen.not_before) == (JobState.SCHEDULED, due)
    assert final is not None and final.state is JobState.SUCCEEDED
    assert 0 <= lateness(job_id, due) <= WINDOW_S


async def test_a_job_due_in_a_second_is_not_held_behind_one_due_in_a_minute(bus) -> None:
    settings, publish, _ = bus
    async with running_worker(app, settings) as worker:
        # One key: on Kafka one partition, the later job first in it.
        later_due = in_(60)
        [later] = await publish([("k", later_due)])
        soon_due = in_(1.0)
        [soon] = await publish([("k", soon_due)])
        await started([soon], 20)
        assert not worker.stopped_by_fault
    late = lateness(soon, soon_due)
    assert 0 <= late <= WINDOW_S, f"started {late:+.3f}s after not_before"
    assert ATTEMPTS[later] == [], "the job due in a minute ran early"


async def test_a_job_due_beyond_the_maximum_delay_is_dead_lettered_and_never_runs(bus) -> None:
    settings, publish, dead_letters = bus
    async with running_worker(app, settings) as worker:
        [too_far, due_now] = await publish([("k", in_(MAX_DELAY_S + 3600)), ("k", in_(0))])
        await started([due_now], 20)
        deadline = time.monotonic() + 20
        while not (letters := await dead_letters()):
            assert time.monotonic() < deadline, "no dead letter"
            await asyncio.sleep(0.2)
        assert not worker.stopped_by_fault
    assert [(d.job_id, d.reason) for d in letters] == [(too_far, "delay-too-long")]
    assert ATTEMPTS[too_far] == []


JOBS = 1000
MAX_DELAY = 60.0


async def test_a_thousand_random_delays_each_start_within_a_second_in_any_order(bus) -> None:
    settings, publish, _ = bus
    rng = random.Random(15)
    delays = [rng.uniform(0.0, MAX_DELAY) for _ in range(JOBS)]  # in random order
    async with running_worker(app, settings) as worker:
        now = datetime.now(UTC)
        due = [now + timedelta(seconds=d) for d in delays]
        ids = await publish([(f"k{n % 50}", d) for n, d in enumerate(due)])
        await started(ids, MAX_DELAY + 20)
        await asyncio.sleep(0.5)
        assert not worker.stopped_by_fault
    late = sorted(lateness(job_id, d) for job_id, d in zip(ids, due, strict=True))
    print(f"lateness: min {late[0]:.3f}s, median {late[JOBS // 2]:.3f}s, max {late[-1]:.3f}s")
    assert late[0] >= 0, f"a job started {-late[0]:.3f}s early"
    assert late[-1] <= WINDOW_S, f"latest {late[-1]:.3f}s; p99 {late[int(0.99 * JOBS)]:.3f}s"


async def test_nats_without_message_schedules_a_delayed_job_is_naked_and_still_on_time() -> None:
    async with nats_bus() as (settings, publish, _):
        client = await nats.connect(NATS_URL)
        try:  # the stream as an older jobstream (or server) left it
            js = client.jetstream()
            info = await js.stream_info(settings.routing.stream)
            await js.delete_stream(settings.routing.stream)
            await js.add_stream(info.config.evolve(allow_msg_schedules=None))
        finally:
            await client.close()
        async with running_worker(app, settings) as worker:
            due = in_(2.0)
            [job_id] = await publish([(None, due)])
            await started([job_id], 20)
            await asyncio.sleep(0.5)
            assert not worker.stopped_by_fault
        [attempt] = ATTEMPTS[job_id]
        assert attempt.attempt == 2, "the nak spent a delivery"
        late = attempt.at - due.timestamp()
        assert 0 <= late <= WINDOW_S, f"started {late:+.3f}s after not_before"
