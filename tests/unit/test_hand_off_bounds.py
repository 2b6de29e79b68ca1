"""Issue 13, K2, on the memory backend (faults a real broker cannot be made to show on cue):
a publish error is transient or permanent. A retry record refused for good dead-letters
the job; a dead letter too large to store whole is stored reduced (body or headers
replaced by their sizes and sha256 digests); a dead letter that cannot be stored at all,
or a broker away past `retry.hand_off_timeout_s`, stops the worker with `WorkerError`
and leaves the job unsettled (its offset is not committed: redelivered, nothing lost).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from consumer import Settings, WorkerError
from consumer.core import Outcome
from consumer.memory import TestApp
from producer import PublishError
from producer.memory import MemoryBroker
from producer.retrying import set_testing
from schemas import MAX_HEADER_BYTES, encode, to_kafka
from tests.apps.hostile import HostileJob, app

TOPIC = "jobs.test.hostile"


@pytest.fixture(autouse=True)
def no_waits() -> Iterator[None]:
    set_testing(True)  # backoff waits are skipped; deadlines are judged as if they ran
    yield
    set_testing(False)


def settings(max_attempts: int = 3, **retry: Any) -> Settings:
    return Settings.model_validate(
        {
            "transport": "memory",
            "retry": {
                "policy": {"max_attempts": max_attempts, "initial_delay_s": 0.01, "jitter": 0},
                "tiers_s": [0.05, 1.0],
                **retry,
            },
        }
    )


def record_bytes(t: TestApp, topic: str = TOPIC, offset: int = 0) -> int:
    [record] = t.broker.read(topic, 0, offset, 1)
    headers = sum(len(n.encode()) + len(v) for n, v in record.headers)
    return len(record.key or b"") + headers + len(record.value)


async def publish_raw(t: TestApp, job: HostileJob, extra: list[tuple[str, bytes]]) -> str:
    """`job` in the Kafka binding plus `extra` headers, appended as a raw record."""
    message = encode(job, source="/tests")
    key, headers = to_kafka(message.attributes)
    await t.broker.append(TOPIC, key, [*headers, *extra], message.body)
    return message.attributes.id


def committed(t: TestApp) -> int:
    """The group's committed position in the job's partition (0: nothing committed)."""
    return t.broker.committed(t.settings.worker.group, TOPIC, 0) or 0


async def test_a_retry_record_refused_for_good_dead_letters_the_job() -> None:
    async with TestApp(app, settings()) as t:
        receipt = await t.publish(HostileJob(behaviour="fail"))
        # Set before the worker runs (no await in between): the next append is the retry.
        t.broker.faults.fail_appends(1, PublishError("memory: refused for good"))
        await t.drain(timeout_s=5)
        assert t.workers[0].stopped_by_fault is False
    assert t.outcome(receipt.job_id) is Outcome.DEAD_LETTERED
    [letter] = t.dead_letters()
    assert (letter.job_id, letter.reason, letter.ext("jobattempt")) == (
        receipt.job_id,
        "retry-record-refused",
        "1",
    )
    assert "refused for good" in (letter.ext("joberror") or "")
    assert committed(t) == 1
    assert t.broker.faults.failed_appends == 1


async def test_a_dead_letter_too_large_to_store_whole_is_stored_with_its_body_reduced() -> None:
    async with TestApp(app, settings(max_attempts=1)) as t:
        receipt = await t.publish(HostileJob(behaviour="fail", padding="p" * 5000))
        t.broker.faults.limit_record_bytes(record_bytes(t) + 200)
        await t.drain(timeout_s=5)
    [original] = t.broker.read(TOPIC, 0, 0, 1)
    [letter] = t.dead_letters()
    assert (letter.job_id, letter.reason) == (receipt.job_id, "retries-exhausted")
    assert letter.value == b""
    assert letter.ext("jobreduced") == "body"
    assert letter.ext("jobbodybytes") == str(len(original.value))
    assert letter.ext("jobbodysha256") == hashlib.sha256(original.value).hexdigest()
    assert "record-too-large" in (letter.ext("jobreducedwhy") or "")
    assert letter.ext("joberror") == "always fails"
    assert committed(t) == 1


async def test_a_dead_letter_whose_headers_are_too_large_is_stored_with_headers_reduced() -> None:
    big = [("x-blob", b"b" * 6000), ("x-tenant", b"acme")]
    async with TestApp(app, settings(max_attempts=1)) as t:
        job_id = await publish_raw(t, HostileJob(behaviour="fail"), big)
        t.broker.faults.limit_record_bytes(record_bytes(t) + 200)
        await t.drain(timeout_s=5)
    [original] = t.broker.read(TOPIC, 0, 0, 1)
    [letter] = t.dead_letters()
    assert (letter.job_id, letter.reason) == (job_id, "retries-exhausted")
    assert letter.ext("jobreduced") == "body,headers"
    assert letter.job_type == "test.hostile"
    assert letter.header("x-blob") is None
    original_headers = b"".join(n.encode() + b"\x00" + v + b"\x00" for n, v in original.headers)
    assert letter.ext("jobheaderssha256") == hashlib.sha256(original_headers).hexdigest()
    assert sum(len(n) + len(v) for n, v in letter.headers) <= MAX_HEADER_BYTES


async def test_a_dead_letter_that_cannot_be_stored_at_all_stops_the_worker_unsettled() -> None:
    broker = MemoryBroker()
    job_ids: list[str] = []

    async def refused_for_good() -> None:
        async with TestApp(app, settings(max_attempts=1), broker=broker) as t:
            job_ids.append((await t.publish(HostileJob(behaviour="fail"))).job_id)
            t.broker.faults.fail_appends(3, PublishError("memory: refused for good"))
            with pytest.raises(WorkerError, match="could not be stored"):
                await t.drain(timeout_s=5)
            assert t.workers[0].stopped_by_fault
            assert committed(t) == 0, "unsettled: redelivered after a restart"
            assert t.broker.faults.failed_appends == 3
            assert t.dead_letters() == []

    with pytest.raises(WorkerError, match="could not be stored"):
        await refused_for_good()  # the harness re-raises the worker's fault on exit
    # The orchestrator restarts the worker: the job is dead-lettered now, nothing lost.
    async with TestApp(app, settings(max_attempts=1), broker=broker) as again:
        await again.drain(timeout_s=5)
    [letter] = again.dead_letters()
    assert (letter.job_id, letter.reason) == (job_ids[0], "retries-exhausted")
    assert committed(again) == 1


async def test_a_broker_away_past_the_hand_off_timeout_stops_the_worker_unsettled() -> None:
    async def away() -> None:
        async with TestApp(app, settings(hand_off_timeout_s=2.0)) as t:
            await t.publish(HostileJob(behaviour="fail"))
            t.broker.faults.fail_appends(1_000_000)  # BrokerUnavailable: transient
            with pytest.raises(WorkerError, match="hand_off_timeout_s"):
                await t.drain(timeout_s=5)
            assert committed(t) == 0
            assert 3 <= t.broker.faults.failed_appends < 100, "retried with backoff, bounded"

    with pytest.raises(WorkerError, match="hand_off_timeout_s"):
        await away()


async def test_a_transient_refusal_is_retried_and_the_job_retried_once() -> None:
    async with TestApp(app, settings()) as t:
        receipt = await t.publish(HostileJob(behaviour="fail-once"))
        t.broker.faults.fail_appends(3)  # BrokerUnavailable, then the broker is back
        await t.drain(timeout_s=5)
    assert [s.outcome for s in t.settlements(receipt.job_id)] == [
        Outcome.RETRYING,
        Outcome.COMPLETED,
    ]
    assert t.dead_letters() == []


async def test_a_reduced_dead_letter_is_not_replayed() -> None:
    """Its body was never stored: a replay would republish the placeholder. `dlq replay`
    says `reduced` and publishes nothing, even when forced."""
    async with TestApp(app, settings(max_attempts=1)) as t:
        await t.publish(HostileJob(behaviour="fail", padding="p" * 5000))
        t.broker.faults.limit_record_bytes(record_bytes(t) + 200)
        await t.drain(timeout_s=5)
        t.broker.faults.reset()
        [letter] = t.dead_letters()
        end = t.broker.end_offset(TOPIC, 0)
        for force in (False, True):
            [result] = await t.backend.replay(t.settings, [letter], force=force)
            assert (result.record.id, result.status) == (letter.id, "reduced")
        assert t.broker.end_offset(TOPIC, 0) == end, "nothing was republished"
