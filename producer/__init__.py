"""Publish typed jobs to Kafka or NATS JetStream.

`JobProducer` is the entry point; `Publisher` is the transport seam under it, with a
Kafka, a NATS and an in-memory implementation. See docs/producer.md.
"""

from producer._errors import BrokerUnavailable, DestinationMissing, PublishError, PublishTimeout
from producer._kafka import KafkaPublisher, kafka_client_options
from producer._memory import MemoryBroker, MemoryPublisher, MemoryRecord
from producer._nats import NatsPublisher, connect_nats
from producer._producer import JobProducer, PublishRequest
from producer._provision import DestinationHook, plan_destinations
from producer._publisher import Publisher, Receipt
from producer._settings import KafkaSettings, NatsSettings, ProducerSettings, RoutingSettings

__all__ = [
    "BrokerUnavailable",
    "DestinationHook",
    "DestinationMissing",
    "JobProducer",
    "KafkaPublisher",
    "KafkaSettings",
    "MemoryBroker",
    "MemoryPublisher",
    "MemoryRecord",
    "NatsPublisher",
    "NatsSettings",
    "ProducerSettings",
    "PublishError",
    "PublishRequest",
    "PublishTimeout",
    "Publisher",
    "Receipt",
    "RoutingSettings",
    "connect_nats",
    "kafka_client_options",
    "plan_destinations",
]
