"""An in-process broker with Kafka's shape, for unit tests and examples.

`MemoryBroker` holds topics, each a fixed number of partitions, each an append-only list of
records, committed offsets per (group, topic, partition), the consumer groups
(`broker.groups`, see `_groups.py`) and deterministic faults (`broker.faults`, see
`_faults.py`). `MemoryPublisher` writes jobs into it as Kafka records; the worker's memory
backend (`consumer.memory`) reads them back as a consumer-group member.

Guarantees (the same as a single Kafka broker):

- Offsets in a partition start at 0 and grow by one per record; records never change.
- A key always maps to the same partition for a given partition count (murmur2, like
  Kafka's default partitioner); records without a key go round-robin.
- A committed offset is the offset of the next record to read (Kafka's convention).
- A group member commits only partitions it owns (`commit_owned`), as Kafka fences a
  member of an older generation.
- Nothing is created implicitly: appending to a missing topic raises `DestinationMissing`
  unless the broker was built with `auto_create=True`.

Every change (a record, a commit, a group or fault change) wakes the callers of
`wait_until`, so clients wait for progress instead of polling.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from producer._errors import DestinationMissing
from producer.memory._faults import CommitFailed, MemoryFaults
from producer.memory._groups import ConsumerGroups, TopicPartition

__all__ = ["MemoryBroker", "MemoryRecord"]

Position = tuple[str, int]
"""(topic, partition); a `TopicPartition` is one."""


class MemoryRecord(NamedTuple):
    """One record stored by the `MemoryBroker`."""

    key: bytes | None
    """The ordering key (the Kafka record key), or None."""
    headers: tuple[tuple[str, bytes], ...]
    """Headers in the Kafka binding (`ce_*`, `content-type`, `traceparent`, ...)."""
    value: bytes
    """The job payload (JSON)."""
    offset: int
    """Position in the partition, from 0."""
    topic: str
    """The topic the record belongs to."""
    partition: int
    """The partition the record belongs to."""
    timestamp: datetime
    """When the broker stored the record (UTC; Kafka's log append time)."""


class MemoryBroker:
    """Topics -> partitions -> append-only records, committed offsets per group, the
    consumer groups (`groups`) and the faults a test injects (`faults`)."""

    def __init__(self, *, default_partitions: int = 1, auto_create: bool = False) -> None:
        """`default_partitions`: partitions of a topic created without a count.
        `auto_create`: create a missing topic on first append instead of refusing it."""
        self._default_partitions = default_partitions
        self._auto_create = auto_create
        self._topics: dict[str, list[list[MemoryRecord]]] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._changes = _Changes()
        self.groups = ConsumerGroups(self._partition_count, self._changes.notify)
        """The consumer groups: membership, assignment, partition ownership."""
        self.faults = MemoryFaults(self.groups, self._changes.notify)
        """Deterministic faults for tests (all off until set)."""

    def create_topic(self, topic: str, partitions: int | None = None) -> bool:
        """Create `topic` unless it exists; returns True if it was created now. The groups
        that read it rebalance to assign its partitions. `ValueError` for `partitions` < 1."""
        if topic in self._topics:
            return False
        count = partitions if partitions is not None else self._default_partitions
        if count < 1:
            msg = f"a topic needs at least one partition, got {count}"
            raise ValueError(msg)
        self._topics[topic] = [[] for _ in range(count)]
        self._round_robin[topic] = itertools.count()
        self.groups.topic_created(topic)
        return True

    def topics(self) -> list[str]:
        """Existing topics, sorted."""
        return sorted(self._topics)

    def partitions(self, topic: str) -> int:
        """Number of partitions of `topic`; `DestinationMissing` if it does not exist."""
        return len(self._partitions_of(topic))

    async def append(
        self,
        topic: str,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        value: bytes,
        *,
        partition: int | None = None,
    ) -> MemoryRecord:
        """Store one record and wake up waiting clients; returns the record once stored
        (acknowledged). Raises `DestinationMissing`, `ValueError` for a partition the topic
        does not have, and what `faults` injects (`BrokerUnavailable`, `RecordTooLarge`)."""
        size = len(key or b"") + len(value) + sum(len(n) + len(v) for n, v in headers)
        await self.faults._before_append(topic, size)
        if topic not in self._topics and self._auto_create:
            self.create_topic(topic)
        partitions = self._partitions_of(topic)
        if partition is None:
            partition = self._choose_partition(topic, key, len(partitions))
        elif not 0 <= partition < len(partitions):
            msg = f"topic {topic!r} has no partition {partition} (it has {len(partitions)})"
            raise ValueError(msg)
        log = partitions[partition]
        stamp = datetime.now(UTC)
        record = MemoryRecord(key, tuple(headers), value, len(log), topic, partition, stamp)
        log.append(record)
        self._changes.notify()
        return record

    def read(
        self, topic: str, partition: int, from_offset: int, max_records: int = 500
    ) -> list[MemoryRecord]:
        """Up to `max_records` records of one partition, starting at `from_offset`."""
        log = self._partitions_of(topic)[partition]
        return log[max(from_offset, 0) : max(from_offset, 0) + max_records]

    def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next record appended to the partition will get."""
        return len(self._partitions_of(topic)[partition])

    def commit(self, group: str, positions: Mapping[Position, int]) -> None:
        """Record, for `group`, the next offset to read of each (topic, partition), as an
        administrator would (no membership needed, no faults). `ValueError` for an offset
        outside [0, end]."""
        for (topic, partition), offset in positions.items():
            end = self.end_offset(topic, partition)
            if not 0 <= offset <= end:
                msg = f"cannot commit offset {offset} on {topic}[{partition}] (end: {end})"
                raise ValueError(msg)
        for (topic, partition), offset in positions.items():
            self._committed[(group, topic, partition)] = offset
        self._changes.notify()

    async def commit_owned(
        self, group: str, member: str, positions: Mapping[TopicPartition, int]
    ) -> None:
        """Commit as group `member`: after the fault's commit delay, `CommitFailed` if the
        connection is down or the member does not own every partition (it was revoked)."""
        await self.faults._before_commit(group)
        owns = self.groups.owns
        lost = [f"{tp.topic}[{tp.partition}]" for tp in positions if not owns(group, member, tp)]
        if lost:
            detail = f"{member} no longer owns {', '.join(lost)}: the group rebalanced"
            raise CommitFailed(group, detail)
        self.commit(group, {(tp.topic, tp.partition): offset for tp, offset in positions.items()})

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        """The committed next offset of `group` on the partition, or None if never."""
        return self._committed.get((group, topic, partition))

    async def wait_until(self, ready: Callable[[], bool], max_wait_s: float | None) -> bool:
        """Wait until `ready()` is true, checking it after every change of the broker.
        Returns `ready()`'s last answer: False if `max_wait_s` seconds passed first (None:
        wait as long as needed)."""
        return await self._changes.wait_until(ready, max_wait_s)

    def wake(self) -> None:
        """Make the callers of `wait_until` check their conditions again: for conditions
        on something outside the broker (a worker that stopped)."""
        self._changes.notify()

    async def wait_for_records(
        self, positions: Mapping[Position, int], max_wait_s: float | None = None
    ) -> bool:
        """Wait until a partition in `positions` has a record at or after its offset.
        Returns False if `max_wait_s` seconds passed first (None: wait as long as needed)."""

        def available() -> bool:
            return any(self.end_offset(t, p) > offset for (t, p), offset in positions.items())

        return await self.wait_until(available, max_wait_s)

    def _partitions_of(self, topic: str) -> list[list[MemoryRecord]]:
        try:
            return self._topics[topic]
        except KeyError:
            raise DestinationMissing("memory", topic) from None

    def _partition_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    def _choose_partition(self, topic: str, key: bytes | None, count: int) -> int:
        if key is None:
            return next(self._round_robin[topic]) % count
        return (murmur2(key) & 0x7FFFFFFF) % count


class _Changes:
    """Wakes every waiter on any change. The event is made per event loop, so a broker
    may outlive the loop of one test and serve the next."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_until(self, ready: Callable[[], bool], max_wait_s: float | None) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max_wait_s):
                while not ready():
                    if self._event is None or self._loop is not loop:
                        self._event, self._loop = asyncio.Event(), loop
                    await self._event.wait()
        except TimeoutError:
            return ready()
        return True


def murmur2(data: bytes) -> int:
    """Kafka's key hash (`org.apache.kafka.common.utils.Utils.murmur2`, the default
    partitioner's): 32-bit MurmurHash2 with seed 0x9747B28C, unsigned. The partition is
    `(murmur2(key) & 0x7FFFFFFF) % partitions`, so the memory broker places keys exactly
    where Kafka would."""
    length = len(data)
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length & ~3
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & 3
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h
