"""The transport seam: what `JobProducer` needs from a broker, and what a publish returns.

A `Publisher` moves encoded jobs (`schemas.JobMessage`) to one broker. `JobProducer` does
everything else (encoding, trace context, routing) once, on top of it. Three publishers
exist: `KafkaPublisher`, `NatsPublisher` and `MemoryPublisher` (in-process, for tests).

Contract every publisher keeps:

- `send` and `send_many` return only after the broker acknowledged every message (Kafka:
  `acks=all`; JetStream: the PubAck), and fail with a `PublishError` subclass otherwise.
- `send_many` is pipelined: it does not wait for one acknowledgement before sending the
  next message, and it returns the receipts in the order of its input.
- Nothing is created implicitly: a missing destination raises `DestinationMissing`;
  `ensure` is the only method that creates topics or streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from producer._settings import Transport
from schemas import JobMessage

__all__ = ["Publisher", "Receipt"]


class Receipt(NamedTuple):
    """The broker's acknowledgement of one published job."""

    job_id: str
    """The job id (CloudEvents `id`)."""
    transport: Transport
    """The broker that stored the job: `kafka`, `nats` or `memory`."""
    destination: str
    """Where the job was stored: the Kafka topic, or the JetStream stream."""
    partition: int | None
    """The Kafka (or in-memory) partition; None on NATS."""
    offset: int
    """The record's offset in its partition, or its JetStream stream sequence."""
    duplicate: bool = False
    """True when nothing new was stored: JetStream dropped the publish as a repeat of the
    same job id (NATS; `offset` is then the sequence of the message stored first), or a
    `unique_key`'s window holds an earlier job and this is that job's receipt, as it was
    returned then (any transport; docs/scheduling.md, "Unique jobs")."""
    spooled: bool = False
    """True when the broker was unavailable and the job was written to the producer's
    durable spool instead (see docs/producer.md, "Spool"): it is stored on local disk and
    published, with this job id, when the broker is back. `partition` is then None and
    `offset` -1."""


class Publisher(Protocol):
    """Sends encoded jobs to one broker. Implementations: Kafka, NATS, in-memory."""

    @property
    def transport(self) -> Transport:
        """Which broker this publisher talks to; selects topic (Kafka, memory) or subject
        (NATS) routing."""
        ...

    async def start(self) -> None:
        """Connect; raises `BrokerUnavailable` within the connect timeout if it cannot."""
        ...

    async def stop(self) -> None:
        """Wait for messages already handed over, then disconnect. Idempotent."""
        ...

    async def ping(self, timeout_s: float) -> None:
        """One round trip to the broker (Kafka: a metadata request; NATS: PING/PONG),
        within `timeout_s`; `BrokerUnavailable` if it does not answer. For readiness."""
        ...

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        """Publish one job to a topic (Kafka, memory) or subject (NATS); return when acked."""
        ...

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        """Publish many jobs without a round trip per job; receipts in input order."""
        ...

    async def ensure(self, destinations: Sequence[str]) -> list[str]:
        """Create what the destinations need (topics; the stream capturing the subjects).
        Returns the names of the topics or streams created now (empty if all existed)."""
        ...
