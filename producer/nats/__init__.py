"""The NATS JetStream backend of the producer: `NatsPublisher`, the connection every nats-py
client of jobstream shares (`connect_nats`), key partitions and stream creation. The only
producer package that imports nats."""

from producer._settings import ProducerSettings
from producer.nats._provision import ensure_nats_stream, nats_replicas, stream_subjects
from producer.nats._publisher import (
    KEY_PARTITIONS_METADATA,
    NatsPublisher,
    connect_nats,
    key_partition,
)

__all__ = [
    "KEY_PARTITIONS_METADATA",
    "NatsPublisher",
    "connect_nats",
    "ensure_nats_stream",
    "key_partition",
    "make_publisher",
    "nats_replicas",
    "stream_subjects",
]


def make_publisher(settings: ProducerSettings) -> NatsPublisher:
    """The publisher `producer._backends` selects for `transport = "nats"`."""
    return NatsPublisher(settings.nats, settings.routing)
