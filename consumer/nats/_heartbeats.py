"""`in_progress` heartbeats for the messages the NATS source holds.

`Heartbeats` owns one background task: every `jetstream.heartbeat_s` it tells JetStream
that each held, unsettled message is still in progress, which restarts its ack wait, so a
job longer than the ack wait is not redelivered while it runs. A message whose ack wait ran
out anyway (a long disconnect) is no longer ours: JetStream has redelivered it, and it is
forgotten (`forget`, the source's) so that its result is not settled here. A message whose
verb is under way (`settling`) gets no heartbeat: one would void a `nak` delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import nats.errors

from consumer.nats._held import Held

log = logging.getLogger("jobstream.nats")


class Heartbeats:
    """Keeps the ack wait of every message in `held` (the source's, read only) running."""

    def __init__(
        self,
        held: Mapping[int, Held],
        interval_s: float,
        ack_wait_s: float,
        forget: Callable[[Held], None],
    ) -> None:
        self._held = held
        self._interval_s = interval_s
        self._ack_wait_s = ack_wait_s
        self._forget = forget
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat(), name="jobstream-nats-heartbeats")

    async def stop(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            now = time.monotonic()
            for held in list(self._held.values()):
                if held.settling or held.done:
                    continue
                if now >= held.deadline:
                    log.warning(
                        "ack wait of %s (seq %d) ran out while it was held: JetStream "
                        "redelivers it, this worker will not settle it",
                        held.msg.subject,
                        held.seq,
                    )
                    self._forget(held)
                    continue
                try:
                    await held.msg.in_progress()
                except nats.errors.Error:
                    continue  # disconnected: the deadline stays, the next beat tries again
                held.deadline = now + self._ack_wait_s
