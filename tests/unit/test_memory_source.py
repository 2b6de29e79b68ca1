"""`MemorySource` keeps KafkaSource's promises, checked one source call at a time:
group assignment and eager rebalances (revoke before release, then commit), new owners
start from the committed offsets, fetch bounds, pause, retries held until due, fencing
of stale deliveries, and what the connection faults do to fetches and commits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from consumer.core import Delivery, Outcome, Settings, WorkerError
from consumer.memory import MemorySource
from producer.memory import MemoryBroker, MemoryPublisher, TopicPartition
from schemas import JobMessage, encode, to_kafka
from schemas.examples import GenerateReport

TOPIC = "jobs.report.generate"
GROUP = "g"


def settings() -> Settings:
    return Settings.model_validate(
        {"transport": "memory", "worker": {"group": GROUP}, "retry": {"tiers_s": [1.0]}}
    )


def message(n: int, key: str | None = None) -> JobMessage:
    return encode(GenerateReport(account_id=f"a{n}", month="2025-01"), source="/t", key=key)


async def fill(broker: MemoryBroker, topic: str, count: int) -> None:
    """`count` records without a key: round-robin over the partitions."""
    publisher = MemoryPublisher(broker)
    for n in range(count):
        await publisher.send(topic, message(n))


class Revokes:
    """An `on_revoke` that records what it was given and what the broker said meanwhile."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.calls: list[list[TopicPartition]] = []
        self.owners_during: list[set[str | None]] = []
        self.committed_during: list[int | None] = []

    async def __call__(self, partitions: Sequence[Hashable]) -> None:
        revoked = [tp for tp in partitions if isinstance(tp, TopicPartition)]
        self.calls.append(revoked)
        self.owners_during.append({self.broker.groups.owner(GROUP, tp) for tp in revoked})
        self.committed_during.append(self.broker.committed(GROUP, TOPIC, 0))


async def started(broker: MemoryBroker, s: Settings | None = None) -> tuple[MemorySource, Revokes]:
    source = MemorySource(broker, s or settings(), [TOPIC])
    revokes = Revokes(broker)
    await source.start(revokes)
    return source, revokes


def broker_with(partitions: int = 4, tiers: int = 0) -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, partitions)
    for n in range(1, tiers + 1):
        broker.create_topic(f"{TOPIC}.retry.{n}", partitions)
    return broker


async def test_members_share_the_partitions_and_revoke_before_release_then_commit() -> None:
    broker = broker_with(partitions=4)
    first, first_revokes = await started(broker)
    await first.fetch(0, 0)
    everything = {TopicPartition(TOPIC, p) for p in range(4)}
    assert first.assignment == everything and first.ready

    await fill(broker, TOPIC, 8)  # round-robin: two per partition
    batch = await first.fetch(100, 0)
    mine = [d for d in batch if d.partition == TopicPartition(TOPIC, 0)]
    for delivery in mine:
        first.settle(delivery, Outcome.COMPLETED)  # settled, not committed yet

    second, _ = await started(broker)
    await first.fetch(0, 0)  # sees the new generation: revokes everything, then commits
    assert first_revokes.calls == [sorted(everything)]
    assert first_revokes.owners_during == [{first.member}], "revoked while still owned"
    assert first_revokes.committed_during == [None], "committed only after on_revoke"
    assert broker.committed(GROUP, TOPIC, 0) == 2
    await second.fetch(0, 0)
    assert first.assignment | second.assignment == everything
    assert not first.assignment & second.assignment
    assert len(first.assignment) == len(second.assignment) == 2
    assert broker.groups.stable(GROUP)

    # Each new owner starts at the group's committed offset: partition 0 after the two
    # settled records, the others from the start (nothing was settled there).
    again = await second.fetch(100, 0) + await first.fetch(100, 0)
    assert sorted(where(d)[1:] for d in again) == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]


async def test_fetch_honours_max_records_and_waits_without_spinning() -> None:
    broker = broker_with(partitions=1)
    source, _ = await started(broker)
    await fill(broker, TOPIC, 10)
    assert [d.offset for d in await source.fetch(3, 1)] == [0, 1, 2]
    assert [d.offset for d in await source.fetch(100, 1)] == list(range(3, 10))

    cpu, wall = time.process_time(), time.monotonic()
    assert await source.fetch(10, 0.3) == []
    assert time.monotonic() - wall >= 0.29
    assert time.process_time() - cpu < 0.1, "an empty fetch must wait, not spin"

    waiting = asyncio.create_task(source.fetch(10, 5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    wall = time.monotonic()
    await fill(broker, TOPIC, 1)
    assert [d.offset for d in await waiting] == [10]
    assert time.monotonic() - wall < 0.5, "a waiting fetch wakes on the append"


async def test_pause_holds_back_records_until_resume() -> None:
    broker = broker_with(partitions=1)
    source, _ = await started(broker)
    await fill(broker, TOPIC, 2)
    source.pause()
    assert await source.fetch(10, 0.05) == []
    source.resume()
    assert [d.offset for d in await source.fetch(10, 0.05)] == [0, 1]


async def test_a_partition_behind_one_unsettled_record_holds_at_most_max_held_offsets() -> None:
    broker = broker_with(partitions=2)
    bounded = Settings.model_validate(
        {"transport": "memory", "worker": {"group": GROUP, "max_held_offsets": 5}}
    )
    source, _ = await started(broker, bounded)
    await fill(broker, TOPIC, 40)  # round-robin: 20 per partition
    first = await source.fetch(100, 0)
    assert sorted(where(d)[1:] for d in first) == [(p, o) for p in (0, 1) for o in range(5)]
    for delivery in first[1:]:
        source.settle(delivery, Outcome.COMPLETED)  # all but the oldest of one partition
    head = first[0]
    assert await source.fetch(100, 0.05) != []  # the other partition moves on
    assert source.tracker.held(head.partition) == 5, "nothing read behind the unsettled head"
    source.settle(head, Outcome.COMPLETED)
    more = await source.fetch(100, 0.05)
    assert [d.offset for d in more if d.partition == head.partition] == [5, 6, 7, 8, 9]


async def test_a_retry_not_due_waits_without_blocking_other_partitions() -> None:
    broker = broker_with(partitions=2, tiers=1)
    tier = f"{TOPIC}.retry.1"
    source, _ = await started(broker)
    now = datetime.now(UTC)
    await append(broker, tier, 0, attempt=2, not_before=now + timedelta(seconds=0.4))
    await append(broker, tier, 1, attempt=2, not_before=now - timedelta(seconds=1))
    await append(broker, TOPIC, 0)

    first = await source.fetch(100, 0)
    assert sorted(where(d) for d in first) == [(TOPIC, 0, 0), (tier, 1, 0)]

    wall = time.monotonic()
    retry = await source.fetch(100, 2)
    assert [where(d) for d in retry] == [(tier, 0, 0)]
    assert retry[0].attributes is not None and retry[0].attributes.attempt == 2
    assert time.monotonic() - wall >= 0.3, "handed out only once due"


async def test_a_retry_due_in_a_day_holds_its_tier_at_most_the_tier_delay() -> None:
    """Tier delay 1 s: a record due in a day is appended again to the tail after 1 s, so
    the retry behind it, due in 0.3 s, waits about 1 s, not a day (K9)."""
    broker = broker_with(partitions=1, tiers=1)
    tier = f"{TOPIC}.retry.1"
    source, _ = await started(broker)
    now = datetime.now(UTC)
    await append(broker, tier, 0, attempt=2, not_before=now + timedelta(days=1))
    await append(broker, tier, 0, attempt=2, not_before=now + timedelta(seconds=0.3))

    wall = time.monotonic()
    soon = await source.fetch(100, 5)
    waited = time.monotonic() - wall
    assert [where(d) for d in soon] == [(tier, 0, 1)]
    assert 0.9 <= waited < 2.5, waited
    for _ in range(100):  # the copy is appended by a task of its own
        if len(stored := broker.read(tier, 0, 0)) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(stored) == 3, "the day-long retry was appended again, once"
    assert (stored[2].key, stored[2].headers) == (stored[0].key, stored[0].headers)
    source.settle(soon[0], Outcome.COMPLETED)
    await source.commit()
    assert broker.committed(GROUP, tier, 0) == 2, "the original settled behind its copy"
    assert await source.fetch(100, 0.3) == [], "the copy waits its tier delay again"
    assert len(broker.read(tier, 0, 0)) == 3, "no busy loop of copies"


async def test_a_delivery_of_an_earlier_assignment_never_settles() -> None:
    broker = broker_with(partitions=1)
    source, revokes = await started(broker)
    await fill(broker, TOPIC, 3)
    old = await source.fetch(100, 0)
    assert all(source.owns(d) for d in old)

    broker.faults.rebalance(GROUP)  # the same member gets the same partition back
    await source.fetch(0, 0)
    assert len(revokes.calls) == 1
    assert source.assignment == {TopicPartition(TOPIC, 0)}
    assert not any(source.owns(d) for d in old), "fetched under the previous assignment"
    for delivery in old:
        source.settle(delivery, Outcome.COMPLETED)  # ignored
    await source.commit()
    assert (broker.committed(GROUP, TOPIC, 0) or 0) == 0, "nothing settled"
    again = await source.fetch(100, 0)
    assert [d.offset for d in again] == [0, 1, 2], "read again from the committed offset"


async def test_stop_leaves_the_group_and_crash_leaves_without_committing() -> None:
    broker = broker_with(partitions=2)
    first, _ = await started(broker)
    second, _ = await started(broker)
    third, third_revokes = await started(broker)
    for source in (first, second, third):
        await source.fetch(0, 0)
    await first.fetch(0, 0)
    await second.fetch(0, 0)
    assert broker.groups.stable(GROUP)

    await first.stop()
    assert first.member is None and not first.ready
    await fill(broker, TOPIC, 4)
    for source in (second, third, second, third):
        await source.fetch(0, 0)
    assert second.assignment | third.assignment == {TopicPartition(TOPIC, p) for p in range(2)}

    batch = await third.fetch(100, 0)
    for delivery in batch:
        third.settle(delivery, Outcome.COMPLETED)  # settled, never committed
    revoked_before = len(third_revokes.calls)
    third.crash()
    assert len(third_revokes.calls) == revoked_before, "a crash calls no on_revoke"
    assert not any(third.owns(d) for d in batch)
    await third.commit()  # a crashed member commits nothing
    assert all(broker.committed(GROUP, TOPIC, p) is None for p in range(2))
    await second.fetch(0, 0)
    await second.fetch(0, 0)
    assert second.assignment == {TopicPartition(TOPIC, p) for p in range(2)}
    assert len(await second.fetch(100, 0)) == 4, "everything after the commit again"


async def test_a_record_without_job_attributes_carries_its_decode_error() -> None:
    broker = broker_with(partitions=1)
    source, _ = await started(broker)
    await broker.append(TOPIC, None, [("ce_type", b"x")], b"{}")
    [delivery] = await source.fetch(10, 0)
    assert delivery.attributes is None
    assert delivery.error is not None
    assert delivery.describe == f"{TOPIC}[0]@0"


async def test_while_disconnected_fetches_return_nothing_and_commits_are_refused() -> None:
    broker = broker_with(partitions=1)
    source, _ = await started(broker)
    await fill(broker, TOPIC, 3)
    batch = await source.fetch(2, 0)
    for delivery in batch:
        source.settle(delivery, Outcome.COMPLETED)

    broker.faults.disconnect()
    assert await source.fetch(10, 0.05) == []
    await source.commit()  # refused, logged, kept for later
    assert broker.faults.refused_commits == 1
    assert broker.committed(GROUP, TOPIC, 0) is None
    assert source.pending_commits() == 2

    waiting = asyncio.create_task(source.fetch(10, 5))
    await asyncio.sleep(0.05)
    broker.faults.reconnect()
    assert [d.offset for d in await waiting] == [2], "woken by the reconnect"
    await source.commit()
    assert broker.committed(GROUP, TOPIC, 0) == 2


async def test_delayed_commits_and_redelivery_rewind_to_the_committed_offsets() -> None:
    broker = broker_with(partitions=1)
    source, revokes = await started(broker)
    await fill(broker, TOPIC, 5)
    batch = await source.fetch(100, 0)
    for delivery in batch[:2]:
        source.settle(delivery, Outcome.COMPLETED)
    broker.faults.delay_commits(0.2)
    wall = time.monotonic()
    await source.commit()
    assert time.monotonic() - wall >= 0.19
    assert broker.committed(GROUP, TOPIC, 0) == 2
    broker.faults.delay_commits(0)

    for delivery in batch[2:]:
        source.settle(delivery, Outcome.COMPLETED)  # settled, not committed
    broker.faults.redeliver(GROUP)
    again = await source.fetch(100, 0)
    assert len(revokes.calls) == 1
    assert broker.committed(GROUP, TOPIC, 0) == 2, "no commit on a rewind"
    assert [d.offset for d in again] == [2, 3, 4]


async def test_start_waits_for_the_connection() -> None:
    broker = broker_with(partitions=1)
    broker.faults.disconnect()
    s = Settings.model_validate({"transport": "memory", "worker": {"broker_wait_s": 0.05}})
    source = MemorySource(broker, s, [TOPIC])
    with pytest.raises(WorkerError, match="reconnect"):
        await source.start(Revokes(broker))


def where(delivery: Delivery) -> tuple[str, int, int]:
    assert isinstance(delivery.partition, TopicPartition)
    return delivery.topic, delivery.partition.partition, delivery.offset


async def append(
    broker: MemoryBroker,
    topic: str,
    partition: int,
    *,
    attempt: int = 1,
    not_before: datetime | None = None,
) -> None:
    attributes = message(0).attributes.replace(attempt=attempt, not_before=not_before)
    key, headers = to_kafka(attributes)
    await broker.append(topic, key, headers, b"{}", partition=partition)
