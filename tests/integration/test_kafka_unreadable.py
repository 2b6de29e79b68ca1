"""Issue 13, K1 on real Kafka: a record aiokafka cannot parse (a header NAME that is not
UTF-8) fails that record, never the worker. It is dead-lettered as `unreadable-record`
with its position, its offset is committed, and the records after it, and those of the
other partitions fetched with it, are each handled exactly once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Hashable, Sequence

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from consumer import Settings
from consumer.core import Delivery
from consumer.kafka import KafkaSource
from tests.apps.hostile import RUNS, HostileJob
from tests.conftest import KAFKA_BOOTSTRAP
from tests.integration.test_hostile_failures import (
    Headers,
    job_record,
    run_to_dead_letters,
    settings_for,
)
from tests.support import routed_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# aiokafka's C record builder encodes header names itself; its pure-Python one calls
# `name.encode()`, so a `str` whose `encode` returns other bytes puts them on the wire.
_PUBLISH_BAD_NAME = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

class RawName(str):
    def encode(self, *args, **kwargs):
        return b"x-\\xff\\xfe"

async def main():
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1], acks="all")
    await producer.start()
    try:
        headers = [(RawName("x-bad"), b"v"), ("ce_type", b"test.hostile")]
        sent = await producer.send_and_wait(sys.argv[2], b"{}", key=b"k", headers=headers,
                                            partition=int(sys.argv[3]))
        print(sent.offset)
    finally:
        await producer.stop()

asyncio.run(main())
"""


async def publish_to(
    topic: str, partition: int, record: tuple[str, bytes | None, Headers, bytes]
) -> None:
    _, key, headers, body = record
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, body, key=key, headers=headers, partition=partition)
    finally:
        await producer.stop()


def publish_bad_header_name(topic: str, partition: int) -> int:
    """Publish a record whose header name is `x-\\xff\\xfe` to `partition`; its offset."""
    env = {**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PUBLISH_BAD_NAME, KAFKA_BOOTSTRAP, topic, str(partition)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout.strip())


@pytest.mark.parametrize("bad", [0, 1])
async def test_a_header_name_that_is_not_utf8_is_dead_lettered_not_a_worker_fault(
    bad, new_topic, group_id, kafka_admin, monkeypatch
) -> None:
    """Partition `bad` holds good, unreadable, good; the other holds three good jobs,
    fetched in the same `getmany` (drained before or after the failing partition)."""
    topic = await routed_topic(new_topic, partitions=2)
    settings = settings_for(topic, group_id, monkeypatch)
    goods = [job_record(HostileJob(behaviour="ok")) for _ in range(5)]
    await publish_to(topic, bad, goods[0])
    bad_offset = await asyncio.to_thread(publish_bad_header_name, topic, bad)
    await publish_to(topic, bad, goods[1])
    for record in goods[2:]:
        await publish_to(topic, 1 - bad, record)

    [letter] = await run_to_dead_letters(topic, settings, kafka_admin, 1)

    assert letter.reason == "unreadable-record"
    assert letter.ext("joberrortype") == "schemas._errors.UnreadableRecord"
    assert "UnicodeDecodeError" in (letter.ext("joberror") or "")
    assert (letter.source, bad_offset) == (f"{topic}[{bad}]@1", 1)
    assert letter.value == b""
    assert {job_id: RUNS[job_id] for job_id, *_ in goods} == {job_id: 1 for job_id, *_ in goods}


async def test_records_fetched_with_an_unreadable_one_from_another_partition_are_kept(
    new_topic, group_id
) -> None:
    """aiokafka's `getmany` drains partition 0, then fails on partition 1 and drops what it
    drained, its position already past it: the source puts partition 0 back."""
    topic = await routed_topic(new_topic, partitions=2)
    source = KafkaSource(Settings(worker={"group": group_id}), [topic])

    async def on_revoke(_: Sequence[Hashable]) -> None:
        return None

    await source.start(on_revoke)
    got: list[Delivery] = []
    try:
        while not source.ready:
            got += await source.fetch(100, 0.1)
        goods = [job_record(HostileJob(behaviour="ok")) for _ in range(5)]
        for record in goods[:3]:
            await publish_to(topic, 0, record)
        await asyncio.sleep(1.5)  # prefetched first, and not taken yet
        await publish_to(topic, 1, goods[3])
        await asyncio.to_thread(publish_bad_header_name, topic, 1)
        await publish_to(topic, 1, goods[4])
        await asyncio.sleep(1.5)
        for _ in range(40):
            got += await source.fetch(100, 0.2)
            if len(got) >= 6:
                break
    finally:
        await source.stop()

    def partition(delivery: Delivery) -> int:
        assert isinstance(delivery.partition, TopicPartition)
        return delivery.partition.partition

    seen = sorted((partition(d), d.offset, d.error.reason if d.error else "ok") for d in got)
    assert seen == [
        (0, 0, "ok"),
        (0, 1, "ok"),
        (0, 2, "ok"),
        (1, 0, "ok"),
        (1, 1, "unreadable-record"),
        (1, 2, "ok"),
    ]
