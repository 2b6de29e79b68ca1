"""Dead-lettering of a message on its last delivery, on NATS JetStream (issue 13, K10).

The last delivery JetStream makes of a message (`num_delivered` = the consumer's
`max_deliver`) is not run: `LastDeliveries` dead-letters it (`max-deliveries`) through the
failure router's callback on a task of its own, then settles it as dead-lettered (the
source terminates it). Only redeliveries that were not failures (crashes, expired ack
waits, drain cut-offs) reach it, since a failing job is dead-lettered at `max_attempts`;
without this it would stay unacknowledged in the stream for ever. A dead letter that
fails is the worker's error (`raise_if_failed`): the message would be lost otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from consumer.core import Delivery, Outcome, WorkerError


class LastDeliveries:
    """Takes the deliveries numbered `max_deliver` out of the run, once `route` was called."""

    def __init__(self, max_deliver: int, settle: Callable[[Delivery, Outcome], None]) -> None:
        self._max_deliver = max_deliver
        self._settle = settle
        self._dead_letter: Callable[[Delivery], Awaitable[object]] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None

    def route(self, dead_letter: Callable[[Delivery], Awaitable[object]]) -> None:
        """Dead-letter each last delivery with `dead_letter` from now on."""
        self._dead_letter = dead_letter

    def take(self, delivery: Delivery) -> bool:
        """True if `delivery` is a last one: it is being dead-lettered, not to be run."""
        dead_letter = self._dead_letter
        if delivery.delivery_count < self._max_deliver or dead_letter is None:
            return False

        async def run() -> None:
            await dead_letter(delivery)
            self._settle(delivery, Outcome.DEAD_LETTERED)

        task = asyncio.create_task(run(), name="jobstream-nats-max-deliveries")
        self._running.add(task)
        task.add_done_callback(self._done)
        return True

    def raise_if_failed(self) -> None:
        error = self._failed
        if error is not None:
            msg = f"a message on its last delivery could not be dead-lettered: {error}"
            raise WorkerError(msg) from error

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the dead letters under way: a message nak'ed on its last
        delivery is lost."""
        if self._running:
            await asyncio.wait(self._running, timeout=timeout_s)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed = self._failed or task.exception()
