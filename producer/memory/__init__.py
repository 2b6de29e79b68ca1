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
    "CommitFailed",
    "MemoryBroker",
    "MemoryFaults",
    "MemoryPublisher",
    "MemoryRecord",
    "RecordTooLarge",
    "TopicPartition",
    "make_publisher",
]


def make_publisher(settings: ProducerSettings) -> MemoryPublisher:
    """The publisher `producer._backends` selects for `transport = "memory"`: a broker of
    its own (pass `JobProducer(publisher=MemoryPublisher(broker))` to share one)."""
    return MemoryPublisher(MemoryBroker(), partitions=settings.routing.partitions)
