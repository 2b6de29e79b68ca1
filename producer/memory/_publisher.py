"""`MemoryPublisher`: a `Publisher` that stores jobs in a `MemoryBroker` as Kafka records
(the same key and `ce_*` headers as the Kafka binding), so a consumer decodes them with
`schemas.from_kafka`. It is also the record publisher of the worker's memory backend
(retry and dead-letter hand-offs)."""

from __future__ import annotations

from collections.abc import Sequence

from producer._errors import BrokerUnavailable, DestinationMissing
from producer._publisher import Receipt
from producer._settings import Transport
from producer.memory._broker import MemoryBroker
from schemas import JobMessage, to_kafka

__all__ = ["MemoryPublisher"]


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

    async def ping(self, timeout_s: float) -> None:
        """`BrokerUnavailable` while the broker's faults keep it disconnected."""
        if not self.broker.faults.connected:
            raise BrokerUnavailable("memory", "the in-memory broker", "disconnected (faults)")

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        key, headers = to_kafka(message.attributes)
        record = await self.broker.append(destination, key, headers, message.body)
        return Receipt(
            message.attributes.id, "memory", destination, record.partition, record.offset
        )

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        # One by one: the broker stores them in input order, as Kafka does per partition.
        return [await self.send(destination, message) for destination, message in items]

    async def send_record(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> Receipt:
        """Store a raw record as-is (the worker's retry and dead-letter path)."""
        record = await self.broker.append(topic, key, headers, value)
        job_id = next(((v or b"").decode(errors="replace") for n, v in headers if n == "ce_id"), "")
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
