"""The settlement verbs of the NATS source, each confirmed by the server.

`Confirmations` owns how a verb reaches JetStream: `+ACK`, `+TERM` and `-NAK` are sent as
requests and count only once JetStream answered (the "double ack"), so a settled job is one
whose verb JetStream took. A verb is retried until the message's ack wait runs out; after
that JetStream redelivers the message anyway, and the verb is given up with a warning.

Acks and terms of settled jobs are queued (`queue`) and sent by one background task; each
batch it takes is confirmed on a task of its own, so one verb waiting for a reply lost with
a dropped connection does not hold back the verbs of later jobs. `settled` returns once
nothing is queued or under way. What a message becomes once its verb ended is the source's
(`forget`, given at construction).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import nats.errors
from nats.aio.client import Client as NatsClient

from consumer.nats._held import Held
from producer.retrying import Backoff, retry

log = logging.getLogger("jobstream.nats")

ACK, TERM, NAK = b"+ACK", b"+TERM", b"-NAK"
_CONFIRM_TIMEOUT_S = 2.0  # for one ack confirmation; acks are retried until the ack wait ends
_CONFIRM_BACKOFF = Backoff(initial_s=0.1, max_s=2.0)


class Confirmations:
    """Confirmed acks, terms and naks of the messages of one source."""

    def __init__(self, publish_timeout_s: float, forget: Callable[[Held], None]) -> None:
        self._publish_timeout_s = publish_timeout_s
        self._forget = forget
        self._client: NatsClient | None = None
        self._acks: deque[tuple[Held, bytes]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.answered = 0.0  # `time.monotonic()` of JetStream's last confirmation

    def start(self, client: NatsClient) -> None:
        """Send the queued verbs over `client` from now on."""
        self._client = client
        self._task = asyncio.create_task(self._acknowledge(), name="jobstream-nats-acks")

    async def stop(self) -> None:
        """Cancel the sending task and every batch under way (their messages stay held)."""
        tasks = [*([self._task] if self._task is not None else []), *self._batches]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def queue(self, held: Held, verb: bytes) -> None:
        """Send `verb` (`ACK` or `TERM`) for `held` in the next batch; `held` is forgotten
        once it was confirmed or given up."""
        self._acks.append((held, verb))
        self._idle.clear()
        self._wake.set()

    async def settled(self) -> None:
        """Return once no verb is queued or under way."""
        await self._idle.wait()

    async def nak(self, held: Held, delay_s: float) -> bool:
        """Hand `held` back for a redelivery in `delay_s`; False if not confirmed."""
        verb = NAK + b" " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        return await self.confirm(held, verb)

    async def hand_back(self, held: Iterable[Held]) -> None:
        """A bare, confirmed `nak` of each message: redelivered at once, to any worker."""
        await asyncio.gather(*(self.confirm(one, NAK) for one in held))

    async def confirm(self, held: Held, verb: bytes) -> bool:
        """Send an ack verb and wait for the server's confirmation, retrying until the ack
        wait runs out (after that JetStream redelivers the message anyway)."""
        client = self._client
        assert client is not None
        # Short: a reply lost with a dropped connection is retried, not waited out.
        timeout = min(self._publish_timeout_s, _CONFIRM_TIMEOUT_S)
        try:
            await retry(
                lambda: client.request(held.msg.reply, verb, timeout=timeout),
                on=lambda error: isinstance(error, nats.errors.Error) and not client.is_closed,
                backoff=_CONFIRM_BACKOFF,
                deadline=held.deadline,  # no heartbeat moves it while the verb is under way
            )
            self.answered = time.monotonic()
        except nats.errors.Error as error:
            verb_name = verb.split()[0].decode()
            log.warning(
                "no confirmation for %s of %s (%r): JetStream will redeliver it",
                verb_name,
                held.msg.subject,
                error,
            )
            return False
        return True

    async def _acknowledge(self) -> None:
        # Each batch is confirmed on its own, so one ack that waits for a lost reply (sent
        # as the connection dropped) does not hold back the acks of later jobs.
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._acks:
                batch = list(self._acks)
                self._acks.clear()
                task = asyncio.create_task(self._confirm_batch(batch))
                self._batches.add(task)
                task.add_done_callback(self._batch_done)

    async def _confirm_batch(self, batch: list[tuple[Held, bytes]]) -> None:
        await asyncio.gather(*(self.confirm(held, verb) for held, verb in batch))
        for held, _ in batch:
            self._forget(held)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if not self._batches and not self._acks:
            self._idle.set()
