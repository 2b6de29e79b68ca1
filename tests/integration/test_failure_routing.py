"""G5 on real Kafka: retry tiers with backoff, the dead-letter topic, replay, strict order."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaProducer

from consumer import Settings
from consumer.core import DeadLetterFilter, DeadLetterRecord
from consumer.kafka import list_dead_letters, read_topics
from tests.apps.recorder import RecordJob, app
from tests.conftest import KAFKA_BOOTSTRAP, REDIS_URL
from tests.support import (
    ROOT,
    caught_up,
    publish_raw,
    read_sink,
    routed_topic,
    running_worker,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_RETRIES = {"max_attempts": 3, "initial_delay_s": 0.5, "multiplier": 2.0, "jitter": 0.0}


def settings_for(topic: str, group: str, monkeypatch, **retry: object) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.record": topic}))
    return Settings(
        worker={"group": group, "commit_interval_s": 0.2, "ordering": "key"},
        retry={"tiers_s": [0.5, 2.0], "policy": FAST_RETRIES, **retry},
    )


async def dead_letters(settings: Settings, topic: str) -> list[DeadLetterRecord]:
    return await list_dead_letters(settings, [topic + ".dlq"], DeadLetterFilter())


async def test_fails_twice_then_succeeds_while_other_partitions_flow(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic)
    settings = settings_for(topic, group_id, monkeypatch)
    [flaky_id] = await publish_raw(
        topic, [("flaky", RecordJob(seq=0, key="flaky", behaviour="fail-twice"))]
    )
    others = [(f"k{i}", RecordJob(seq=i, key=f"k{i}", sleep_ms=20)) for i in range(1, 400)]
    async with running_worker(app, settings):
        await publish_raw(topic, others)
        await wait_until(
            lambda: any(line.job_id == flaky_id for line in read_sink(sink)), 30, "the flaky job"
        )
    runs = [
        line
        for line in read_sink(sink, None)
        if line.job_id == flaky_id and line.outcome != "start"
    ]
    assert [(line.attempt, line.outcome) for line in runs] == [
        (1, "raised"),
        (2, "raised"),
        (3, "done"),
    ]
    # Backoff 0.5 s then 1.0 s (no jitter): attempt 3 starts at least 1.5 s after attempt 1.
    assert runs[2].start - runs[0].end >= 1.5
    during_wait = [
        x for x in read_sink(sink) if x.job_id != flaky_id and runs[0].end < x.end < runs[2].start
    ]
    assert len(during_wait) >= 20, "other keys and partitions kept flowing during the backoff"
    assert len({x.job_id for x in read_sink(sink)}) == 400


async def test_every_kind_of_failure_lands_in_the_dead_letter_topic(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch)
    failing = [
        ("a", RecordJob(seq=0, key="a", behaviour="raise")),
        ("b", RecordJob(seq=1, key="b", behaviour="dead-letter")),
    ]
    ids = await publish_raw(topic, failing)
    [good_id] = await publish_raw(topic, [("c", RecordJob(seq=2, key="c"))])
    headers = [
        (b"ce_specversion", b"1.0"),
        (b"ce_source", b"/t"),
        (b"ce_time", b"2026-11-22T10:00:00Z"),
    ]

    def h(job_id: str, job_type: str = "test.record") -> list[tuple[str, bytes]]:
        return [(k.decode(), v) for k, v in headers] + [
            ("ce_id", job_id.encode()),
            ("ce_type", job_type.encode()),
        ]

    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"\xff\xfe not json", headers=h("bytes-1"))
        await producer.send_and_wait(topic, b'{"seq": 1}', headers=h("unknown-1", "no.such.type"))
        await producer.send_and_wait(topic, b'{"seq": "one"}', headers=h("invalid-1"))
        await producer.send_and_wait(topic, b'{"seq": 1}', headers=[("x-other", b"1")])
    finally:
        await producer.stop()
    async with running_worker(app, settings):
        await wait_until(
            lambda: any(x.job_id == good_id for x in read_sink(sink)), 30, "the good job"
        )
        await wait_until_dead_letters(settings, topic, 6)
    records = await dead_letters(settings, topic)
    by_id = {r.job_id or "no-id": r for r in records}
    assert {job_id: r.reason for job_id, r in by_id.items()} == {
        ids[0]: "retries-exhausted",
        ids[1]: "dead-letter-requested",
        "bytes-1": "undecodable-body",
        "unknown-1": "unknown-type",
        "invalid-1": "invalid-payload",
        "no-id": "invalid-attributes",
    }
    exhausted = by_id[ids[0]]
    assert exhausted.ext("jobattempt") == "3"
    assert exhausted.ext("joberrortype") == "RuntimeError"
    assert "always fails" in (exhausted.ext("joberror") or "")
    assert "Traceback" in (exhausted.ext("jobtraceback") or "")
    assert exhausted.ext("jobsrctopic") == topic and exhausted.ext("jobsrcoffset") == "0"
    assert exhausted.ext("jobgroup") == group_id
    assert exhausted.ext("jobfirstfail") and exhausted.ext("joblastfail")
    assert json.loads(exhausted.value) == {
        "seq": 0,
        "key": "a",
        "sleep_ms": 0,
        "behaviour": "raise",
    }
    names = [name for name, _ in exhausted.headers]
    assert len(names) == len(set(names)), "failure headers are replaced, never appended"
    assert by_id["bytes-1"].value == b"\xff\xfe not json"
    assert ("x-other", b"1") in by_id["no-id"].headers


async def wait_until_dead_letters(settings: Settings, topic: str, count: int) -> None:
    for _ in range(300):
        if len(await dead_letters(settings, topic)) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {count} dead letters")


async def test_thousand_jobs_each_completed_or_dead_lettered_never_both(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic)
    settings = settings_for(
        topic, group_id, monkeypatch, policy={**FAST_RETRIES, "max_attempts": 2}
    )
    behaviours = [
        "raise" if i % 10 == 0 else "fail-once" if i % 10 == 1 else "ok" for i in range(1000)
    ]
    jobs = [
        (f"k{i % 37}", RecordJob(seq=i, key=f"k{i % 37}", behaviour=b))  # type: ignore[arg-type]
        for i, b in enumerate(behaviours)
    ]
    ids = await publish_raw(topic, jobs)
    async with running_worker(app, settings):
        await wait_until(lambda: len(read_sink(sink)) >= 900, 60, "900 completions")
        await wait_until_dead_letters(settings, topic, 100)
    done = collections.Counter(x.job_id for x in read_sink(sink))
    dead = collections.Counter(r.job_id for r in await dead_letters(settings, topic))
    assert max(done.values()) == 1 and max(dead.values()) == 1
    assert not set(done) & set(dead)
    assert set(done) | set(dead) == set(ids)
    assert {ids[i] for i in range(0, 1000, 10)} == set(dead)


async def test_strict_key_order_retries_in_place(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic, partitions=1)
    settings = settings_for(topic, group_id, monkeypatch, in_place=True)
    jobs = [
        ("k", RecordJob(seq=i, key="k", behaviour="fail-twice" if i == 2 else "ok"))
        for i in range(10)
    ]
    jobs += [(f"other{i}", RecordJob(seq=100 + i, key=f"other{i}")) for i in range(20)]
    await publish_raw(topic, jobs)
    async with running_worker(app, settings):
        await wait_until(lambda: len(read_sink(sink)) == 30, 30, "30 completions")
    done = read_sink(sink)
    assert [x.seq for x in done if x.key == "k"] == list(range(10))
    assert next(x.attempt for x in done if x.seq == 2) == 3
    # Other keys did not wait for the failing key: all of them finished before it did.
    finished_k2 = next(x.end for x in done if x.seq == 2)
    assert all(x.end < finished_k2 for x in done if x.key.startswith("other"))


def _cli(*args: str, env: dict[str, str]) -> list[dict[str, str]]:
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_replay_brings_fixed_jobs_back_once(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic, partitions=1)
    ledger = await new_topic(partitions=1)
    settings = settings_for(topic, group_id, monkeypatch, replay_ledger_topic=ledger)
    monkeypatch.setenv("JOBSTREAM_TEST_BROKEN", "1")  # the bug: every job dead-letters
    ids = await publish_raw(topic, [(f"k{i}", RecordJob(seq=i, key=f"k{i}")) for i in range(5)])
    async with running_worker(app, settings):
        await wait_until_dead_letters(settings, topic, 5)
    monkeypatch.delenv("JOBSTREAM_TEST_BROKEN")  # the fix is deployed
    env = {
        **os.environ,
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
        "JOBSTREAM_RETRY__REPLAY_LEDGER_TOPIC": ledger,
        "PYTHONPATH": str(ROOT),
    }
    listed = _cli("dlq", "list", "--json", "--topic", topic + ".dlq", env=env)
    assert sorted(entry["job_id"] for entry in listed) == sorted(ids)
    dry = _cli(
        "dlq", "replay", "--type", "test.record", "--topic", topic + ".dlq", "--dry-run", env=env
    )
    assert {entry["status"] for entry in dry} == {"would-replay"}
    first = _cli("dlq", "replay", "--type", "test.record", "--topic", topic + ".dlq", env=env)
    assert [entry["status"] for entry in first] == ["replayed"] * 5
    async with running_worker(app, settings):
        await wait_until(lambda: len(read_sink(sink)) == 5, 30, "5 replayed jobs to complete")
    assert sorted(x.job_id for x in read_sink(sink)) == sorted(ids)
    assert len(await read_topics(settings, [topic])) == 10  # 5 originals + 5 replays
    second = _cli("dlq", "replay", "--type", "test.record", "--topic", topic + ".dlq", env=env)
    assert [entry["status"] for entry in second] == ["already-replayed"] * 5
    assert len(await read_topics(settings, [topic])) == 10, "nothing republished"
    replayed = [r for r in await read_topics(settings, [topic]) if r.ext("jobreplayof")]
    assert {r.ext("jobattempt") for r in replayed} == {"1"}
    assert all(r.ext("jobreason") is None for r in replayed)


async def test_sigkill_between_hand_off_and_commit_accounts_for_every_job_once(
    new_topic, group_id, tmp_path, monkeypatch, kafka_admin
) -> None:
    sink = tmp_path / "sink"
    topic = await routed_topic(new_topic)
    settings = settings_for(topic, group_id, monkeypatch)
    behaviours = ["dead-letter", "fail-once", "ok"]
    jobs = [
        (f"k{i}", RecordJob(seq=i, key=f"k{i}", behaviour=behaviours[i % 3])) for i in range(300)
    ]  # type: ignore[arg-type]
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_RETRY__TIERS_S="[0.5, 2.0]",
        JOBSTREAM_RETRY__POLICY__INITIAL_DELAY_S="0.5",
        JOBSTREAM_IDEMPOTENCY__BACKEND="redis",
        JOBSTREAM_IDEMPOTENCY__URL=REDIS_URL,
        JOBSTREAM_IDEMPOTENCY__NAMESPACE=group_id.replace("-", "_"),
        JOBSTREAM_IDEMPOTENCY__LEASE_S="2",
        # No commit until the kill: every hand-off so far is redelivered after the restart.
        JOBSTREAM_WORKER__COMMIT_INTERVAL_S="600",
        JOBSTREAM_WORKER__COMMIT_EVERY="100000",
    )
    ids = await publish_raw(topic, jobs)
    first = start_worker(env, tmp_path / "first.log")
    try:
        await wait_until_dead_letters(settings, topic, 100)
        await wait_until(lambda: len(read_sink(sink)) >= 200, 60, "200 completions")
    finally:
        first.kill()
        first.wait(10)
    # Everything was handed off or completed, nothing committed: a new worker reads it all again.
    second = start_worker(
        {**env, "JOBSTREAM_WORKER__COMMIT_INTERVAL_S": "0.5"}, tmp_path / "second.log"
    )
    try:
        for _ in range(600):  # until the group committed everything in the topic and its tiers
            if await caught_up(
                kafka_admin, group_id, [topic, f"{topic}.retry.1", f"{topic}.retry.2"]
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the second worker did not settle every record")
    finally:
        assert stop_worker(second) == 0
    done = collections.Counter(line.job_id for line in read_sink(sink))
    dead = collections.Counter(r.job_id for r in await dead_letters(settings, topic))
    assert set(done) | set(dead) == set(ids)
    assert not set(done) & set(dead)
    assert max(done.values()) == 1, "completed jobs redelivered after the crash were skipped"
    assert max(dead.values()) == 1, (
        "dead-lettered jobs redelivered after the crash were not routed twice"
    )
