"""The Kafka backend of the worker: `KafkaSource` (consumer-group membership, retry tiers
held until due, batched commits after settle), failure routing to tier and dead-letter
topics, provisioning, and dead-letter listing and replay with a compacted ledger topic.
The only consumer package that imports aiokafka; selected by `consumer/_backends.py`."""

from consumer.kafka._backend import KafkaBackend
from consumer.kafka._dead_letters import ReplayLedger, list_dead_letters, read_topics, replay
from consumer.kafka._source import KafkaSource

__all__ = [
    "BACKEND",
    "KafkaBackend",
    "KafkaSource",
    "ReplayLedger",
    "list_dead_letters",
    "read_topics",
    "replay",
]

BACKEND = KafkaBackend()
