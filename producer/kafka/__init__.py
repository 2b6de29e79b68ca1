"""The Kafka backend of the producer: `KafkaPublisher` (an idempotent aiokafka producer,
`acks=all`), the client options every aiokafka client of jobstream shares, and topic
creation. The only producer package that imports aiokafka."""

from producer._settings import ProducerSettings
from producer.kafka._provision import ensure_kafka_topics, kafka_replication
from producer.kafka._publisher import KafkaPublisher, kafka_client_options
from producer.kafka._refusal import start_client

__all__ = [
    "KafkaPublisher",
    "ensure_kafka_topics",
    "kafka_client_options",
    "kafka_replication",
    "make_publisher",
    "start_client",
]


def make_publisher(settings: ProducerSettings) -> KafkaPublisher:
    """The publisher `producer._backends` selects for `transport = "kafka"`."""
    return KafkaPublisher(settings.kafka, settings.routing)
