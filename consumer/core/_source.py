"""The transport seam of the worker: what a broker must offer the runtime.

The runtime (dispatch, concurrency, idempotency, failure routing) is written once against
`Source`; Kafka, NATS and the in-memory broker implement it. A source hands out
`Delivery` objects and is told when each is settled; what "settled" turns into (a batched
offset commit, an ack) is the source's business, decided by its `OffsetTracker`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from consumer.core._outcome import Outcome
from schemas import JobAttributes, JobDecodeError

RevokeCallback = Callable[[Sequence[Hashable]], Awaitable[None]]


@dataclass(slots=True)
class Delivery:
    """One record handed to the runtime, with everything needed to settle or route it."""

    partition: Hashable
    """Where ordering and commits are tracked (Kafka: a TopicPartition)."""
    offset: int
    """Position in the partition (Kafka offset, JetStream stream sequence)."""
    topic: str
    """Topic / subject the record was read from."""
    attributes: JobAttributes | None
    """The parsed CloudEvents attributes, or None when they could not be parsed."""
    body: bytes
    """The record value, untouched."""
    raw_key: bytes | None = None
    raw_headers: list[tuple[str, bytes | None]] = field(default_factory=list)
    """The record's headers as received, for the dead-letter copy (untrusted: Kafka allows
    a null value and repeated names)."""
    error: JobDecodeError | None = None
    """Why the attributes could not be parsed (the record goes to the dead-letter topic)."""
    handle: Any = None
    """Transport-specific handle (a NATS message)."""
    delivery_count: int = 1
    """How often the broker delivered this record (JetStream); Kafka always 1."""

    @property
    def key(self) -> str | None:
        return self.attributes.key if self.attributes is not None else None

    @property
    def describe(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Source(Protocol):
    """A consumer-group member that fetches deliveries and settles them."""

    @property
    def ready(self) -> bool:
        """Joined the group and received an assignment (possibly empty: explicitly idle)."""

    async def start(self, on_revoke: RevokeCallback) -> None:
        """Join the group. `on_revoke` is awaited before partitions are released: the
        runtime drains their in-flight jobs there; the source commits right after it."""

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        """Up to `max_records` deliveries, waiting at most `timeout_s` for the first.
        `max_records=0` only keeps the membership alive (polls while paused)."""

    def pause(self) -> None:
        """Stop fetching from the broker (the in-flight bound is reached)."""

    def resume(self) -> None:
        """Fetch again."""

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """The delivery is settled with `outcome`; the source commits or acks it (now or
        batched). JetStream maps outcomes onto its verbs (ack, term); a retry the router
        already handed back (`nak` with a delay) is left alone."""

    def pending_commits(self) -> int:
        """Settled deliveries the next commit would newly cover (drives commit batching)."""

    async def commit(self) -> None:
        """Commit everything settled so far (never past an unsettled delivery)."""

    def owns(self, delivery: Delivery) -> bool:
        """False once the delivery's partition was revoked: its result must not settle."""

    async def stop(self) -> None:
        """Leave the group and close connections (after the runtime's final commit)."""
