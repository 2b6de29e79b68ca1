"""Issue 13, K9 and K10, on the real brokers: when a retry runs, when the retry budget ends,
and what becomes of a job that JetStream stops delivering.

- K9a (Kafka): a retry asking for a day (`Retry(delay_s=86400)`) does not hold the retries
  behind it on its tier partition; it is appended to the tail of the tier again, unchanged,
  at most once per tier delay.
- K9b (Kafka, `retry.in_place`): the retry budget ends in-place retries too.
- K9c (NATS): the budget counts from the first failure, not from when JetStream stored the
  message, so a job delivered after a backlog keeps its whole budget.
- K10 (NATS): a job redelivered up to `max_deliver` by cut-offs (never a handler failure) is
  dead-lettered with reason `max-deliveries`, not left unacknowledged in the stream.

Every wait polls with a deadline; the assertions name job ids, reasons and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from consumer import Settings, Worker
from consumer.core import DeadLetterFilter, DeadLetterRecord
from consumer.kafka import list_dead_letters, read_topics
from consumer.nats import ensure_dead_letter_stream, list_nats_dead_letters, stream_destinations
from producer.nats import ensure_nats_stream
from tests.apps.retry_timing import ATTEMPTS, TimedJob, app
from tests.conftest import NATS_URL
from tests.support import (
    ROOT,
    nats_env,
    publish_nats,
    publish_raw,
    routed_topic,
    running_worker,
    start_worker,
    stop_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_S = 40.0  # generous: two cores shared with other test runs


async def until(
    check: Callable[[], Awaitable[bool]], what: str, worker: Worker | None = None
) -> None:
    """Poll `check` until it holds; fail with `what` after `DEADLINE_S`, or at once if the
    worker stopped by a fault."""
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        assert worker is None or not worker.stopped_by_fault, "the worker stopped by a fault"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(0.1)


# -- Kafka -------------------------------------------------------------------------------


def kafka_settings(
    topic: str, group: str, monkeypatch: pytest.MonkeyPatch, **retry: object
) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.timed": topic}))
    return Settings(
        worker={"group": group, "commit_interval_s": 0.2},
        retry={"tiers_s": [0.5, 2.0], **retry},
    )


async def test_a_day_long_retry_does_not_hold_the_retries_due_in_seconds_behind_it(
    new_topic, group_id, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    last_tier = topic + ".retry.2"  # tiers [0.5, 2.0]: both retries below go to tier 2
    settings = kafka_settings(
        topic, group_id, monkeypatch, policy={"max_attempts": 3, "jitter": 0.0}
    )
    async with running_worker(app, settings) as worker:
        [parked] = await publish_raw(
            topic, [("k", TimedJob(behaviour="retry", delay_s=86400, fail_attempts=1))]
        )

        async def in_tier(job_id: str, copies: int = 1) -> bool:
            found = await read_topics(settings, [last_tier])
            return sum(r.job_id == job_id for r in found) >= copies

        await until(lambda: in_tier(parked), "the day-long retry in the last tier", worker)
        # Behind it on the same tier partition: a retry due one second after its failure.
        [short] = await publish_raw(
            topic, [("k", TimedJob(behaviour="retry", delay_s=1.0, fail_attempts=1))]
        )

        async def retried() -> bool:
            return len(ATTEMPTS[short]) >= 2

        await until(retried, "the one-second retry behind the day-long one", worker)
        first, second = ATTEMPTS[short][:2]
        waited = second.started - first.started
        # Due after 1 s; held at most the tier's delay (2 s) by the record before it.
        assert 1.0 <= waited <= 15.0, f"the one-second retry waited {waited:.1f}s"
        await until(lambda: in_tier(parked, 2), "the day-long retry appended again", worker)
        assert not worker.stopped_by_fault
    assert [a.attempt for a in ATTEMPTS[short]] == [1, 2]
    assert [a.attempt for a in ATTEMPTS[parked]] == [1], "the day-long retry never ran again"
    copies = [r for r in await read_topics(settings, [last_tier]) if r.job_id == parked]
    # Unchanged copies: the same attempt, due time and failure details.
    assert {
        (r.ext("jobattempt"), r.ext("jobnotbefore"), r.ext("jobfirstfail")) for r in copies
    } == {
        (copies[0].ext("jobattempt"), copies[0].ext("jobnotbefore"), copies[0].ext("jobfirstfail"))
    }
    assert copies[0].ext("jobattempt") == "2"
    # Bounded: appended again at most once per tier delay, not in a busy loop.
    elapsed = time.monotonic() - ATTEMPTS[parked][0].started
    assert len(copies) <= elapsed / 2.0 + 2, f"{len(copies)} copies in {elapsed:.1f}s"


async def test_in_place_retries_end_when_the_retry_budget_is_spent(
    new_topic, group_id, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    policy = {
        "max_attempts": 1000,  # the budget, not the attempts, must end it
        "initial_delay_s": 0.2,
        "multiplier": 1.0,
        "jitter": 0.0,
        "budget_s": 1.5,
    }
    settings = kafka_settings(topic, group_id, monkeypatch, in_place=True, policy=policy)
    async with running_worker(app, settings) as worker:
        [job_id] = await publish_raw(topic, [("k", TimedJob(behaviour="error"))])
        letters: list[DeadLetterRecord] = []

        async def dead_lettered() -> bool:
            nonlocal letters
            letters = await list_dead_letters(settings, [topic + ".dlq"], DeadLetterFilter())
            return bool(letters)

        await until(dead_lettered, "the in-place retries to end at the budget", worker)
    [letter] = letters
    attempts = ATTEMPTS[job_id]
    assert (letter.job_id, letter.reason) == (job_id, "retry-budget-exhausted")
    # About 1.5 s of 0.2 s delays: a handful of attempts, nowhere near max_attempts.
    assert 2 <= len(attempts) <= 10, [a.attempt for a in attempts]
    assert attempts[-1].started - attempts[0].started <= 1.5
    assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
    assert letter.ext("jobattempt") == str(len(attempts)), "the dead letter names the last"


# -- NATS --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nats_stream(
    group: str, worker: dict[str, object] | None = None, **overrides: object
) -> AsyncIterator[tuple[Settings, str]]:
    """A fresh job stream and dead-letter stream; settings of a worker group on them."""
    stream = f"RT_{uuid.uuid4().hex[:8]}".upper()
    prefix = stream.lower()
    subject = f"{prefix}.test.timed"
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": group, **(worker or {})},
        **overrides,
    )
    client = await nats.connect(NATS_URL)
    js: JetStreamContext = client.jetstream()
    try:
        await ensure_nats_stream(js, stream_destinations(settings, [subject]), settings.routing)
        await ensure_dead_letter_stream(js, settings, [subject])
        yield settings, subject
    finally:
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        await client.close()


async def nats_dead_letters(settings: Settings) -> list[DeadLetterRecord]:
    return await list_nats_dead_letters(settings, [], DeadLetterFilter())


async def test_nats_budget_counts_from_the_first_failure_not_from_when_the_job_was_stored() -> None:
    policy = {"max_attempts": 5, "jitter": 0.0, "budget_s": 5.5}
    async with nats_stream("rt-budget", retry={"policy": policy}) as (settings, subject):
        # Retried every 0.5 s, completes at its third attempt: 1 s from its first failure.
        [backlogged] = await publish_nats(
            subject, [(None, TimedJob(behaviour="retry", delay_s=0.5, fail_attempts=2))]
        )
        # Retried every 2 s: the third failure (4 s after the first) leaves no room.
        [spent] = await publish_nats(
            subject, [(None, TimedJob(behaviour="retry", delay_s=2.0, fail_attempts=0))]
        )
        # A backlog: both wait in the stream longer than the whole budget.
        await asyncio.sleep(6.5)
        letters: list[DeadLetterRecord] = []

        async def settled() -> bool:
            nonlocal letters
            letters = await nats_dead_letters(settings)
            return len(ATTEMPTS[backlogged]) >= 3 and bool(letters)

        async with running_worker(app, settings) as worker:
            await until(settled, "the backlogged job to complete and the other to end", worker)
            assert not worker.stopped_by_fault
        assert [a.attempt for a in ATTEMPTS[backlogged]] == [1, 2, 3]
        [letter] = letters
        assert (letter.job_id, letter.reason) == (spent, "retry-budget-exhausted")
        assert letter.ext("jobattempt") == "3"
        spent_attempts = ATTEMPTS[spent]
        assert [a.attempt for a in spent_attempts] == [1, 2, 3]
        # The budget ran from the job's first failure (the worker's), not from when the
        # stream stored it, 6.5 s earlier.
        first_failure = datetime.fromisoformat(letter.ext("jobfirstfail") or "")
        assert abs(first_failure.timestamp() - spent_attempts[0].at) < 1.0


async def test_nats_a_job_cut_off_on_every_delivery_is_dead_lettered_at_max_deliver() -> None:
    overrides: dict[str, object] = {
        "retry": {"policy": {"max_attempts": 1}},
        "jetstream": {"max_deliver_margin": 1},  # max_deliver 2
    }
    worker = {"drain_timeout_s": 0.5, "cancel_grace_s": 0.5}
    async with nats_stream("rt-maxdeliver", worker, **overrides) as (settings, subject):
        [hung, done] = await publish_nats(
            subject, [(None, TimedJob(behaviour="hang")), (None, TimedJob(behaviour="ok"))]
        )

        def ran(job_id: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(ATTEMPTS[job_id]) >= 1

            return check

        # Delivery 1: cut off by the drain timeout as the worker stops (handed back).
        async with running_worker(app, settings) as worker:
            await until(ran(hung), "the first delivery to start", worker)
            await until(ran(done), "the other job to complete", worker)
        assert len(ATTEMPTS[hung]) == 1
        letters: list[DeadLetterRecord] = []

        async def dead_lettered() -> bool:
            nonlocal letters
            letters = await nats_dead_letters(settings)
            return bool(letters)

        # Delivery 2 is the last one JetStream makes: dead-lettered, not run.
        async with running_worker(app, settings) as worker:
            await until(dead_lettered, "the dead letter of the job cut off twice", worker)
            client = await nats.connect(NATS_URL)
            try:
                js = client.jetstream()

                async def terminated() -> bool:
                    info = await js.consumer_info(settings.routing.stream, "rt-maxdeliver")
                    return info.num_ack_pending == 0

                await until(terminated, "the original to be terminated", worker)
            finally:
                await client.close()
            assert not worker.stopped_by_fault
        [letter] = letters
        assert (letter.job_id, letter.reason) == (hung, "max-deliveries")
        assert letter.ext("joberrortype") == "consumer.core._errors.MaxDeliveries"
        assert len(ATTEMPTS[hung]) == 1, "the last delivery was not run"
        assert [a.attempt for a in ATTEMPTS[done]] == [1]


async def test_nats_a_job_whose_worker_is_killed_on_every_delivery_is_dead_lettered(
    tmp_path: Path,
) -> None:
    overrides: dict[str, object] = {
        "retry": {"policy": {"max_attempts": 1}},
        "jetstream": {"max_deliver_margin": 1, "ack_wait_s": 1.0},  # max_deliver 2
    }
    async with nats_stream("rt-killed", **overrides) as (settings, subject):
        marks = tmp_path / "marks"
        env = {
            **os.environ,
            **nats_env(settings.routing.stream, settings.routing.subject_prefix.rstrip(".")),
            "JOBSTREAM_WORKER__GROUP": "rt-killed",
            "JOBSTREAM_RETRY__POLICY__MAX_ATTEMPTS": "1",
            "JOBSTREAM_JETSTREAM__MAX_DELIVER_MARGIN": "1",
            "JOBSTREAM_JETSTREAM__ACK_WAIT_S": "1",
            "JOBSTREAM_HEALTH__PORT": "0",
            "JOBSTREAM_LOGGING__LEVEL": "WARNING",
            "RETRY_TIMING_MARKS": str(marks),
            "PYTHONPATH": str(ROOT),
        }
        [killed] = await publish_nats(subject, [(None, TimedJob(behaviour="hang"))])
        # Delivery 1 runs in a worker process that is SIGKILLed while the job runs.
        worker = start_worker(env, tmp_path / "worker.log", "tests.apps.retry_timing:app")
        try:

            async def started() -> bool:
                return marks.exists() and killed in marks.read_text().split()

            await until(started, "the first delivery to start in the worker process")
        finally:
            stop_worker(worker, signal.SIGKILL)
        letters: list[DeadLetterRecord] = []

        async def dead_lettered() -> bool:
            nonlocal letters
            letters = await nats_dead_letters(settings)
            return bool(letters)

        # Delivery 2 (after the ack wait) is the last one: dead-lettered, not run.
        async with running_worker(app, settings) as survivor:
            await until(dead_lettered, "the dead letter of the job whose worker died", survivor)
            assert not survivor.stopped_by_fault
        [letter] = letters
        assert (letter.job_id, letter.reason) == (killed, "max-deliveries")
        assert marks.read_text().split() == [killed], "run once, in the killed worker"
        assert ATTEMPTS[killed] == [], "the last delivery was not run"
