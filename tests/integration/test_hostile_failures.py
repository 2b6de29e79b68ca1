"""Issue 13, K1, K2 and K8 (foreign headers) on real Kafka: whatever comes from a record or
from a handler's exception fails the JOB (a dead letter with a reason), never the worker;
a retry or dead letter the broker refuses for good changes course instead of being retried
forever; what a job carries survives its retry and its dead letter.

Each test runs an in-process worker and checks, by job id, where the job ended, that the
worker is still running (no fault), and that the group committed past every record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from consumer import Settings, Worker
from consumer.core import DeadLetterFilter, DeadLetterRecord
from consumer.kafka import list_dead_letters, read_topics
from schemas import MAX_HEADER_BYTES, encode, to_kafka
from tests.apps.hostile import RUNS, HostileJob, app
from tests.conftest import KAFKA_BOOTSTRAP
from tests.support import caught_up, routed_topic, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Headers = list[tuple[str, bytes | None]]


def settings_for(topic: str, group: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.hostile": topic}))
    return Settings(
        worker={"group": group, "commit_interval_s": 0.2},
        retry={
            "tiers_s": [0.5, 2.0],
            "policy": {"max_attempts": 2, "initial_delay_s": 0.2, "jitter": 0.0},
        },
    )


def job_record(
    job: HostileJob, *, extensions: dict[str, str] | None = None, extra: Headers = ()
) -> tuple[str, bytes | None, Headers, bytes]:
    """(job id, key, headers, body) of `job` in the Kafka binding, plus `extra` headers."""
    message = encode(job, source="/tests")
    attributes = message.attributes.with_extensions(**(extensions or {}))
    key, headers = to_kafka(attributes)
    return attributes.id, key, [*headers, *extra], message.body


async def publish(topic: str, records: Sequence[tuple[bytes | None, Headers, bytes]]) -> None:
    """With a plain aiokafka producer: the bytes exactly as given, null header values too."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for key, headers, body in records:
            await producer.send_and_wait(topic, body, key=key, headers=headers)
    finally:
        await producer.stop()


async def dead_letters(settings: Settings, topic: str) -> list[DeadLetterRecord]:
    return await list_dead_letters(settings, [topic + ".dlq"], DeadLetterFilter())


async def until_dead_lettered(
    worker: Worker, settings: Settings, topic: str, count: int
) -> list[DeadLetterRecord]:
    """Wait for `count` dead letters; fail at once if the worker stopped by a fault."""
    found: list[DeadLetterRecord] = []
    for _ in range(300):
        assert not worker.stopped_by_fault, "bad input stopped the worker"
        found = await dead_letters(settings, topic)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} dead letters, found {len(found)}")


async def run_to_dead_letters(
    topic: str,
    settings: Settings,
    admin: AIOKafkaAdminClient,
    count: int,
) -> list[DeadLetterRecord]:
    """Run a worker until `count` dead letters exist; check it kept running and that the
    group committed every record of the main and tier topics."""
    async with running_worker(app, settings) as worker:
        letters = await until_dead_lettered(worker, settings, topic, count)
        tiers = [topic + ".retry.1", topic + ".retry.2"]
        for _ in range(100):
            if await caught_up(admin, settings.worker.group, [topic, *tiers]):
                break
            await asyncio.sleep(0.1)
        assert not worker.stopped_by_fault
    assert await caught_up(admin, settings.worker.group, [topic, *tiers]), "offsets committed"
    return letters


def header_bytes(record: DeadLetterRecord) -> int:
    return len(record.key or b"") + sum(len(n.encode()) + len(v) for n, v in record.headers)


# -- K1: untrusted exceptions and records ----------------------------------------------------


async def test_a_3000_emoji_message_is_retried_then_dead_lettered_within_the_header_limit(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    job_id, key, headers, body = job_record(HostileJob(behaviour="emoji"))
    await publish(topic, [(key, headers, body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    assert (letter.job_id, letter.reason, letter.ext("jobattempt")) == (
        job_id,
        "retries-exhausted",
        "2",
    )
    error = letter.ext("joberror") or ""
    assert error.startswith("\N{GRINNING FACE}") and len(error.encode()) <= 1000
    assert header_bytes(letter) <= MAX_HEADER_BYTES
    [retried] = await read_topics(settings, [topic + ".retry.1"])
    assert retried.job_id == job_id and header_bytes(retried) <= MAX_HEADER_BYTES


async def test_an_exception_whose_str_raises_is_dead_lettered(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    job_id, key, headers, body = job_record(HostileJob(behaviour="unprintable"))
    await publish(topic, [(key, headers, body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    assert (letter.job_id, letter.reason) == (job_id, "retries-exhausted")
    assert letter.ext("joberrortype") == "tests.apps.hostile.UnprintableError"
    assert "unprintable" in (letter.ext("joberror") or "")


@pytest.mark.parametrize(
    ("behaviour", "reason", "attempts"),
    [
        ("nan-delay", "retries-exhausted", "2"),  # nan: the policy's delay instead
        ("huge-delay", "retry-budget-exhausted", "1"),  # 1e12 s: past the budget
        ("inf-delay", "retry-budget-exhausted", "1"),
        ("negative-delay", "retries-exhausted", "2"),  # retried at once
    ],
)
async def test_a_nonsense_retry_delay_is_the_jobs_failure(
    behaviour, reason, attempts, new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    job_id, key, headers, body = job_record(HostileJob(behaviour=behaviour))
    await publish(topic, [(key, headers, body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    assert (letter.job_id, letter.reason, letter.ext("jobattempt")) == (job_id, reason, attempts)


async def test_a_first_failure_time_without_utc_offset_is_not_a_worker_fault(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    naive = job_record(
        HostileJob(behaviour="fail"), extensions={"jobfirstfail": "2026-01-01T00:00:00"}
    )
    garbage = job_record(HostileJob(behaviour="fail"), extensions={"jobfirstfail": "yesterday"})
    await publish(topic, [naive[1:], garbage[1:]])
    letters = await run_to_dead_letters(topic, settings, kafka_admin, 2)
    assert {(x.job_id, x.reason) for x in letters} == {
        (naive[0], "retries-exhausted"),
        (garbage[0], "retries-exhausted"),
    }
    for letter in letters:  # replaced by a valid time: the budget counts from the failure
        assert (letter.ext("jobfirstfail") or "").endswith("Z")


async def test_a_record_whose_ce_id_header_is_null_is_dead_lettered_and_committed(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    _, key, headers, body = job_record(HostileJob(behaviour="ok"))
    nulled: Headers = [(n, None if n == "ce_id" else v) for n, v in headers]
    nulled.append(("x-empty", None))
    _, good_key, good_headers, good_body = job_record(HostileJob(behaviour="ok"))
    await publish(topic, [(key, nulled, body), (good_key, good_headers, good_body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    assert letter.reason == "invalid-attributes"
    assert "ce_id" in (letter.ext("joberror") or "")
    assert letter.value == body and letter.job_id in (None, "")
    assert letter.offset == 0


# -- K2: refused for good --------------------------------------------------------------------


async def test_a_job_near_the_size_limit_that_fails_is_dead_lettered_reduced(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    base = len(encode(HostileJob(behaviour="fail"), source="/tests").body)
    job = HostileJob(behaviour="fail", padding="x" * (1_047_849 - base))
    job_id, key, headers, body = job_record(job)
    assert len(body) == 1_047_849
    _, after_key, after_headers, after_body = job_record(HostileJob(behaviour="ok"))
    await publish(topic, [(key, headers, body), (after_key, after_headers, after_body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    assert (letter.job_id, letter.reason) == (job_id, "retry-record-refused")
    assert letter.value == b""
    assert letter.ext("jobreduced") == "body"
    assert letter.ext("jobbodybytes") == str(len(body))
    assert letter.ext("jobbodysha256") == hashlib.sha256(body).hexdigest()
    assert "record-too-large" in (letter.ext("jobreducedwhy") or "")


# -- K8: foreign headers ------------------------------------------------------------------------


async def test_a_foreign_header_survives_the_retry_record_and_the_dead_letter(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    tenant: Headers = [("x-tenant", b"acme"), ("X-Request-Id", b"r-1")]
    job_id, key, headers, body = job_record(HostileJob(behaviour="fail"), extra=tenant)
    await publish(topic, [(key, headers, body)])
    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)
    [retried] = await read_topics(settings, [topic + ".retry.1"])
    for record in (retried, letter):
        assert record.job_id == job_id
        assert ("x-tenant", b"acme") in record.headers
        assert ("X-Request-Id", b"r-1") in record.headers
        names = [n.lower() for n, _ in record.headers]
        assert len(names) == len(set(names)), "no header twice"
    assert letter.ext("jobattempt") == "2"


async def test_a_record_with_two_different_traceparents_is_processed_not_dead_lettered(
    new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    """K8: what OpenTelemetry's aiokafka instrumentation produces when a service also
    publishes with jobstream. Trace context is best-effort: the first one wins."""
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    second = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job = HostileJob(behaviour="ok")
    message = encode(job, source="/tests", traceparent=first)
    key, headers = to_kafka(message.attributes)
    await publish(topic, [(key, [*headers, ("traceparent", second.encode())], message.body)])
    job_id = message.attributes.id
    async with running_worker(app, settings) as worker:
        for _ in range(100):
            if RUNS[job_id] and await caught_up(kafka_admin, group_id, [topic]):
                break
            await asyncio.sleep(0.1)
        assert not worker.stopped_by_fault
        assert worker.counts.get("completed") == 1
    assert RUNS[job_id] == 1
    assert await dead_letters(settings, topic) == []
    assert await caught_up(kafka_admin, group_id, [topic])
