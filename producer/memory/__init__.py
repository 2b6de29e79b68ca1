"""The in-memory backend of the producer: a `MemoryBroker` with Kafka's semantics (topics,
partitions, offsets, committed positions per group) inside one process, and the
`MemoryPublisher` that stores jobs in it. For tests, examples and the consumer's memory
backend (`consumer.memory`); no broker client is imported."""

from producer._settings import ProducerSettings
from producer.memory._broker import MemoryBroker, MemoryPublisher, MemoryRecord

__all__ = ["MemoryBroker", "MemoryPublisher", "MemoryRecord", "make_publisher"]


def make_publisher(settings: ProducerSettings) -> MemoryPublisher:
    """The publisher `producer._backends` selects for `transport = "memory"`: a broker of
    its own (pass `JobProducer(publisher=MemoryPublisher(broker))` to share one)."""
    return MemoryPublisher(MemoryBroker(), partitions=settings.routing.partitions)
