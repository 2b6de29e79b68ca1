"""What the NATS source keeps per durable consumer and per fetched message, and how a
redelivered message's attributes are read."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from consumer.core import FIRST_FAILURE
from schemas import JobAttributes


@dataclass(frozen=True, slots=True)
class ConsumerPartition:
    """`Delivery.partition` on NATS: the durable consumer a message came from (the unit of
    ordering in `partition` mode). Its `partition` is what failure details record."""

    partition: str

    def __str__(self) -> str:
        return self.partition


@dataclass(eq=False, slots=True)
class Held:
    """A message this worker fetched and has not settled yet."""

    msg: Msg
    puller: Puller
    seq: int
    delivered: int
    stored: datetime
    deadline: float  # time.monotonic() when JetStream's ack wait runs out
    settling: bool = False  # ack/term/nak under way: no more heartbeats
    done: bool = False


@dataclass(eq=False, slots=True)
class Puller:
    """Pull requests to one durable consumer, never more messages asked for than `room`."""

    consumer: str
    partitioned: bool
    level: int = 0  # its priority level (`_provision.PlannedConsumer.level`)
    name: ConsumerPartition = field(init=False)
    inbox: str = ""
    subscription: Subscription | None = None
    requests: deque[list[float]] = field(default_factory=deque)  # [remaining, deadline]
    unsettled: int = 0
    not_before: float = 0.0
    busy: bool = False  # the last pull was filled: it has a backlog (`_pulls`, priorities)
    probe_at: float = 0.0  # its next `no_wait` pull of one while idle; 0: never asked (`_pulls`)

    def __post_init__(self) -> None:
        self.name = ConsumerPartition(self.consumer)

    @property
    def outstanding(self) -> int:
        return int(sum(request[0] for request in self.requests))

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0][1] < now:
            self.requests.popleft()


def redelivered(attributes: JobAttributes, held: Held, first_failure: str | None) -> JobAttributes:
    """Attempt from the delivery count; a redelivered message cannot carry new headers, so
    its first failure is the one recorded in the KV bucket (`_first_failures`), never
    when JetStream stored it: the retry budget counts from the first failure."""
    changes: dict[str, str] = {}
    if first_failure is not None and FIRST_FAILURE not in attributes.extensions:
        changes[FIRST_FAILURE] = first_failure
    attempt = attributes.attempt + held.delivered - 1
    return attributes.replace(attempt=attempt).with_extensions(**changes)
