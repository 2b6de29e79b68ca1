"""The in-memory backend of the producer: a `MemoryBroker` with Kafka's semantics (topics,
partitions, offsets, consumer groups, committed positions) inside one process, its
deterministic faults (`broker.faults`), and the `MemoryPublisher` that stores jobs in it.
For tests, examples and the consumer's memory backend (`consumer.memory`); no broker
client is imported."""

from producer._settings import ProducerSettings
from producer.memory._broker import MemoryBroker, MemoryRecord
from producer.memory._faults import CommitFailed, MemoryFaults, RecordTooLarge
from producer.memory._groups import TopicPartition
from producer.memory._publisher import MemoryPublisher

__all__ = [
    "BROKER",
    "CommitFailed",
    "MemoryBroker",
    "MemoryFaults",
    "MemoryPublisher",
    "MemoryRecord",
    "RecordTooLarge",
    "TopicPartition",
    "make_publisher",
]


BROKER = MemoryBroker()
"""The process's broker for `transport = "memory"`: the producer's publisher and the
worker's backend (`consumer.memory.BACKEND`) share it, so a `JobProducer` and a worker in
one process reach each other. Tests that want isolation make their own `MemoryBroker`."""


def make_publisher(settings: ProducerSettings) -> MemoryPublisher:
    """The publisher `producer._backends` selects for `transport = "memory"`, on `BROKER`
    (pass `JobProducer(publisher=MemoryPublisher(broker))` for another broker)."""
    return MemoryPublisher(BROKER, partitions=settings.routing.partitions)
