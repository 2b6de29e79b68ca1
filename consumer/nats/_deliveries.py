"""How a NATS message the source holds becomes the runtime's `Delivery`.

`DeliveryReader` owns the decoding of a batch of held messages: the CloudEvents NATS
binding (`from_nats`; a decode error travels in the `Delivery`), attempts counted as
deliveries (`JobAttributes.attempt` is the JetStream delivery count), and the first
failure of a redelivered job, read from the KV bucket the failure router wrote it to
(`_first_failures`), so that its retry budget counts from that failure. First deliveries
cost no I/O.
"""

from __future__ import annotations

import asyncio

from consumer.core import Delivery
from consumer.nats._first_failures import FirstFailures
from consumer.nats._held import Held, redelivered
from schemas import JobAttributes, JobDecodeError, from_nats


class DeliveryReader:
    """Reads held messages as deliveries, with the first failures in `first_failures`."""

    def __init__(self, first_failures: FirstFailures) -> None:
        self._first_failures = first_failures

    async def read(self, taken: list[Held]) -> list[Delivery]:
        """The deliveries of `taken`, in order, but for those done meanwhile."""
        again = [held for held in taken if held.delivered > 1]  # no I/O for first deliveries
        recalled: dict[int, str | None] = {}
        if again:
            found = await asyncio.gather(*(self._first_failures.recall(held) for held in again))
            recalled = {held.seq: first for held, first in zip(again, found, strict=True)}
        return [
            _delivery(held, recalled.get(held.seq))
            for held in taken
            if not held.done  # its ack wait ran out while the first failures were read
        ]


def _delivery(held: Held, first_failure: str | None) -> Delivery:
    msg = held.msg
    headers = msg.headers or {}
    attributes: JobAttributes | None
    try:
        attributes = from_nats(headers)
        error: JobDecodeError | None = None
    except JobDecodeError as exc:
        attributes, error = None, exc
    if attributes is not None and held.delivered > 1:
        attributes = redelivered(attributes, held, first_failure)
    return Delivery(
        partition=held.puller.name,
        offset=held.seq,
        topic=msg.subject,
        attributes=attributes,
        body=msg.data,
        raw_headers=[(name, value.encode()) for name, value in headers.items()],
        error=error,
        handle=msg,
        delivery_count=held.delivered,
    )
