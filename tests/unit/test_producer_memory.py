"""The in-memory broker keeps Kafka's promises: offsets, stable key partitioning, commits."""

from __future__ import annotations

import asyncio

import pytest

from producer import DestinationMissing
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import encode, from_kafka
from schemas.examples import GenerateReport


async def test_offsets_start_at_zero_and_grow_per_partition() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    records = [await broker.append("t", None, [], b"%d" % i) for i in range(6)]
    # No key: round-robin, so each partition gets every other record.
    assert [(r.partition, r.offset) for r in records] == [
        (0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2),
    ]  # fmt: skip
    assert [r.value for r in broker.read("t", 1, 1)] == [b"3", b"5"]
    assert broker.read("t", 1, 1, max_records=1)[0].value == b"3"
    assert broker.end_offset("t", 0) == 3


async def test_a_key_always_lands_in_the_same_partition() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=6)
    first = [(await broker.append("t", b"user-%d" % i, [], b"")).partition for i in range(50)]
    again = [(await broker.append("t", b"user-%d" % i, [], b"")).partition for i in range(50)]
    assert first == again
    assert len(set(first)) > 1  # keys spread over partitions
    # Kafka's default partitioner (murmur2) gives the same answer, so tests mirror Kafka.
    assert first[0] == (await broker.append("t", b"user-0", [], b"")).partition


async def test_missing_topic_is_refused_unless_auto_create() -> None:
    with pytest.raises(DestinationMissing, match="topics ensure"):
        await MemoryBroker().append("nope", None, [], b"")
    broker = MemoryBroker(auto_create=True, default_partitions=3)
    await broker.append("new", None, [], b"")
    assert broker.partitions("new") == 3
    assert broker.topics() == ["new"]


async def test_commit_stores_the_next_offset_per_group() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    for _ in range(3):
        await broker.append("t", None, [], b"")
    assert broker.committed("g", "t", 0) is None
    broker.commit("g", {("t", 0): 2})
    assert broker.committed("g", "t", 0) == 2
    assert broker.committed("other", "t", 0) is None
    with pytest.raises(ValueError, match="cannot commit offset 4"):
        broker.commit("g", {("t", 0): 4})


async def test_wait_for_records_wakes_on_append_and_times_out() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    assert await broker.wait_for_records({("t", 0): 0}, max_wait_s=0.01) is False

    waiter = asyncio.create_task(broker.wait_for_records({("t", 0): 0}))
    await asyncio.sleep(0)  # let the waiter block on the condition
    assert not waiter.done()
    await broker.append("t", None, [], b"x")
    assert await asyncio.wait_for(waiter, 1) is True
    # Already available: returns at once.
    assert await broker.wait_for_records({("t", 0): 0}, max_wait_s=0) is True


async def test_publisher_stores_kafka_binding_records() -> None:
    publisher = MemoryPublisher(partitions=4)
    assert await publisher.ensure(["jobs.report.generate", "jobs.report.generate"]) == [
        "jobs.report.generate"
    ]
    assert await publisher.ensure(["jobs.report.generate"]) == []
    message = encode(GenerateReport(account_id="a", month="2025-01"), source="/t", key="acct")
    receipt = await publisher.send("jobs.report.generate", message)
    [record] = publisher.broker.read("jobs.report.generate", receipt.partition or 0, 0)
    assert record.value == message.body
    assert from_kafka(record.key, record.headers) == message.attributes


async def test_send_record_stores_raw_bytes_as_is() -> None:
    publisher = MemoryPublisher(MemoryBroker(auto_create=True))
    receipt = await publisher.send_record("dlq", b"k", [("ce_id", b"job-1")], b"\xff")
    assert (receipt.job_id, receipt.destination, receipt.offset) == ("job-1", "dlq", 0)
    assert publisher.broker.read("dlq", 0, 0)[0].value == b"\xff"


async def test_check_names_every_missing_topic() -> None:
    publisher = MemoryPublisher()
    await publisher.ensure(["a"])
    await publisher.check(["a"])
    with pytest.raises(DestinationMissing, match="topics b, c do not exist"):
        await publisher.check(["a", "b", "c"])
