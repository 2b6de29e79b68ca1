"""What a backend can do, for the runtime and the contract suite (as Watermill's
`Features`): a test of a guarantee a backend cannot give is skipped with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Features:
    """The capabilities of one backend (`consumer.kafka`, `consumer.nats`,
    `consumer.memory`)."""

    name: Literal["kafka", "nats", "memory"]
    """The `transport` setting that selects the backend."""
    separate_processes: bool
    """Workers in separate OS processes share the broker, so a worker can be SIGKILLed
    or SIGSTOPped for real. False for memory: its broker lives in one process, and a
    crash is simulated by abandoning a worker without a drain or a commit."""
    retries: Literal["records", "redelivery"]
    """`records`: a retry is a new record in a retry tier topic (Kafka, memory);
    `redelivery`: the broker redelivers the message after a delay (JetStream `nak`)."""
    key_order: Literal["always", "key-partitions"]
    """When jobs of one key run in publish order across a group: `always` (the key picks
    a partition); `key-partitions` only with `jetstream.key_partitions` > 0 (NATS)."""
    replay_ledger: str
    """Where replays are recorded so each dead letter is replayed once unless forced."""
