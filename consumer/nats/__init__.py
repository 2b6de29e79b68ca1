"""The NATS JetStream backend of the worker: `NatsSource` (durable pull consumers shared by
the group, confirmed acks after settle, `in_progress` heartbeats, key partitions, one set
of consumers per priority level weighted by `worker.priority_weights`), retries
as delayed redeliveries, the dead-letter stream, provisioning, the KV idempotency store, and
dead-letter listing and replay with a KV ledger. The only consumer package that imports
nats-py; selected by `consumer/_backends.py` (the KV store also by `idempotency.backend`)."""

from consumer.nats._backend import NatsBackend
from consumer.nats._dead_letters import list_nats_dead_letters, nats_replay_headers, replay_nats
from consumer.nats._kv_store import NatsKvIdempotencyStore, bucket_config, provision_bucket
from consumer.nats._provision import (
    consumer_plan,
    dead_letter_subjects,
    ensure_consumers,
    ensure_dead_letter_stream,
    ensure_key_partitions,
    ensure_replay_ledger,
    max_deliver,
    stream_destinations,
)
from consumer.nats._routing import NatsFailureRouter
from consumer.nats._source import NatsSource

__all__ = [
    "BACKEND",
    "NatsBackend",
    "NatsFailureRouter",
    "NatsKvIdempotencyStore",
    "NatsSource",
    "bucket_config",
    "consumer_plan",
    "dead_letter_subjects",
    "ensure_consumers",
    "ensure_dead_letter_stream",
    "ensure_key_partitions",
    "ensure_replay_ledger",
    "list_nats_dead_letters",
    "max_deliver",
    "nats_replay_headers",
    "provision_bucket",
    "replay_nats",
    "stream_destinations",
]

BACKEND = NatsBackend()
