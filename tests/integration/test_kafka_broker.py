"""The local Kafka behaves like a real cluster: groups, manual commits, restarts."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.conftest import KAFKA_BOOTSTRAP

pytestmark = pytest.mark.integration


async def _drain(consumer: AIOKafkaConsumer, expected: int) -> list[tuple[int, int, bytes]]:
    """Read until `expected` records arrived, or until an empty poll after that many."""
    seen: list[tuple[int, int, bytes]] = []
    empty_polls = 0
    while empty_polls < 3:
        batch = await consumer.getmany(timeout_ms=1000)
        records = [record for records in batch.values() for record in records]
        empty_polls = 0 if records else empty_polls + 1
        seen.extend((r.partition, r.offset, r.value or b"") for r in records)
        if len(seen) >= expected and not records:
            break
    return seen


def _consumer(topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=KAFKA_BOOTSTRAP,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def test_manual_commit_survives_a_consumer_restart(new_topic, group_id) -> None:
    topic = await new_topic(partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(topic, f"first-{i}".encode(), partition=i % 3)
    finally:
        await producer.stop()

    consumer = _consumer(topic, group_id)
    await consumer.start()
    try:
        first = await _drain(consumer, 30)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert sorted(v for _, _, v in first) == sorted(f"first-{i}".encode() for i in range(30))
    assert {p for p, _, _ in first} == {0, 1, 2}

    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for i in range(9):
            await producer.send_and_wait(topic, f"second-{i}".encode(), partition=i % 3)
    finally:
        await producer.stop()

    consumer = _consumer(topic, group_id)
    await consumer.start()
    try:
        second = await _drain(consumer, 9)
    finally:
        await consumer.stop()
    # After the restart the group resumes at the committed offsets: only the new records.
    assert sorted(v for _, _, v in second) == sorted(f"second-{i}".encode() for i in range(9))
    offsets = [(p, o) for p, o, _ in first + second]
    assert len(offsets) == len(set(offsets)) == 39
