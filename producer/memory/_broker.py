"""An in-process broker with Kafka's shape, for unit tests and examples.

`MemoryBroker` holds topics, each a fixed number of partitions, each an append-only list of
records, plus committed offsets per (group, topic, partition). `MemoryPublisher` writes jobs
into it with the same key and headers as the Kafka binding, so a consumer decodes them with
`schemas.from_kafka`. The worker's in-memory source reads them back.

Guarantees (the same as a single Kafka broker):

- Offsets in a partition start at 0 and grow by one per record; records never change.
- A key always maps to the same partition for a given partition count (murmur2, like
  Kafka's default partitioner); records without a key go round-robin.
- A committed offset is the offset of the next record to read (Kafka's convention).
- Nothing is created implicitly: appending to a missing topic raises `DestinationMissing`
  unless the broker was built with `auto_create=True`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from producer._errors import DestinationMissing
from producer._publisher import Receipt
from producer._settings import Transport
from schemas import JobMessage, to_kafka

__all__ = ["MemoryBroker", "MemoryPublisher", "MemoryRecord"]

Position = tuple[str, int]
"""(topic, partition)."""


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


class MemoryBroker:
    """Topics -> partitions -> append-only records, and committed offsets per group."""

    def __init__(self, *, default_partitions: int = 1, auto_create: bool = False) -> None:
        """`default_partitions`: partitions of a topic created without a count.
        `auto_create`: create a missing topic on first append instead of refusing it."""
        self._default_partitions = default_partitions
        self._auto_create = auto_create
        self._topics: dict[str, list[list[MemoryRecord]]] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._appended = asyncio.Condition()

    def create_topic(self, topic: str, partitions: int | None = None) -> bool:
        """Create `topic` unless it exists; returns True if it was created now."""
        if topic in self._topics:
            return False
        count = partitions if partitions is not None else self._default_partitions
        if count < 1:
            msg = f"a topic needs at least one partition, got {count}"
            raise ValueError(msg)
        self._topics[topic] = [[] for _ in range(count)]
        self._round_robin[topic] = itertools.count()
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
        """Store one record and wake up `wait_for_records` callers; returns the record."""
        if topic not in self._topics and self._auto_create:
            self.create_topic(topic)
        partitions = self._partitions_of(topic)
        if partition is None:
            partition = self._choose_partition(topic, key, len(partitions))
        elif not 0 <= partition < len(partitions):
            msg = f"topic {topic!r} has no partition {partition} (it has {len(partitions)})"
            raise ValueError(msg)
        log = partitions[partition]
        record = MemoryRecord(key, tuple(headers), value, len(log), topic, partition)
        log.append(record)
        async with self._appended:
            self._appended.notify_all()
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
        """Record, for `group`, the next offset to read of each (topic, partition)."""
        for (topic, partition), offset in positions.items():
            end = self.end_offset(topic, partition)
            if not 0 <= offset <= end:
                msg = f"cannot commit offset {offset} on {topic}[{partition}] (end: {end})"
                raise ValueError(msg)
            self._committed[(group, topic, partition)] = offset

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        """The committed next offset of `group` on the partition, or None if never."""
        return self._committed.get((group, topic, partition))

    async def wait_for_records(
        self, positions: Mapping[Position, int], max_wait_s: float | None = None
    ) -> bool:
        """Wait until a partition in `positions` has a record at or after its offset.
        Returns False if `max_wait_s` seconds passed first (None: wait as long as needed)."""

        def available() -> bool:
            return any(self.end_offset(t, p) > offset for (t, p), offset in positions.items())

        async with self._appended:
            try:
                async with asyncio.timeout(max_wait_s):
                    await self._appended.wait_for(available)
            except TimeoutError:
                return False
        return True

    def _partitions_of(self, topic: str) -> list[list[MemoryRecord]]:
        try:
            return self._topics[topic]
        except KeyError:
            raise DestinationMissing("memory", topic) from None

    def _choose_partition(self, topic: str, key: bytes | None, count: int) -> int:
        if key is None:
            return next(self._round_robin[topic]) % count
        return (murmur2(key) & 0x7FFFFFFF) % count


class MemoryPublisher:
    """A `Publisher` that stores jobs in a `MemoryBroker`, encoded as Kafka records."""

    def __init__(self, broker: MemoryBroker | None = None, *, partitions: int = 1) -> None:
        """`partitions`: partition count of the topics `ensure` creates."""
        self.broker = broker if broker is not None else MemoryBroker()
        self._partitions = partitions

    @property
    def transport(self) -> Transport:
        return "memory"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        key, headers = to_kafka(message.attributes)
        record = await self.broker.append(destination, key, headers, message.body)
        return Receipt(
            message.attributes.id, "memory", destination, record.partition, record.offset
        )

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        return [await self.send(destination, message) for destination, message in items]

    async def send_record(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> Receipt:
        """Store a raw record as-is (the worker's retry and dead-letter path)."""
        record = await self.broker.append(topic, key, headers, value)
        job_id = next((v.decode() for n, v in headers if n == "ce_id"), "")
        return Receipt(job_id, "memory", topic, record.partition, record.offset)

    async def check(self, destinations: Sequence[str]) -> None:
        """Raise `DestinationMissing` naming every topic that does not exist."""
        missing = [t for t in dict.fromkeys(destinations) if t not in self.broker.topics()]
        if missing:
            raise DestinationMissing("memory", ", ".join(missing))

    async def ensure(self, destinations: Sequence[str]) -> list[str]:
        return [
            t for t in dict.fromkeys(destinations) if self.broker.create_topic(t, self._partitions)
        ]


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
