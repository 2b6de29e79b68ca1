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

A batch is sent as plain publishes whose replies come to one wildcard inbox of this
source, and waited for together, with one timeout (`_Round`); only the verbs left without
a reply are sent again. A request per verb (a task, a future, a timer and a reply token
each) cost about 20 µs of CPU per job (issue 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

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
        self._inbox = ""
        self._replies: Subscription | None = None
        self._rounds: dict[str, tuple[_Round, int]] = {}  # by reply subject
        self._tokens = itertools.count()
        self.resent = 0
        """Verbs sent again because their reply did not come within a round."""

    async def start(self, client: NatsClient) -> None:
        """Send the queued verbs over `client` from now on."""
        self._client = client
        self._inbox = client.new_inbox()
        self._replies = await client.subscribe(f"{self._inbox}.*", cb=self._on_reply)
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
        """Send the verbs of `batch` until each one was confirmed or its message's ack wait
        ran out; then forget every message of it."""
        client = self._client
        assert client is not None
        timeout = min(self._publish_timeout_s, _CONFIRM_TIMEOUT_S)
        left, attempt = batch, 0
        while left:
            attempt += 1
            left = await self._send_round(client, left, timeout)
            if client.is_closed:
                self._give_up(left)
                break
            now = time.monotonic()
            self._give_up([item for item in left if now >= item[0].deadline])
            left = [item for item in left if now < item[0].deadline]
            if left:
                self.resent += len(left)
                await asyncio.sleep(_CONFIRM_BACKOFF.wait(attempt))
        for held, _ in batch:
            self._forget(held)

    async def _send_round(
        self, client: NatsClient, verbs: list[tuple[Held, bytes]], timeout_s: float
    ) -> list[tuple[Held, bytes]]:
        """Publish `verbs` with replies to our inbox; wait `timeout_s` at most for all of
        the replies. Returns the verbs that got none."""
        round_ = _Round(len(verbs))
        subjects = []
        try:
            for index, (held, verb) in enumerate(verbs):
                subject = f"{self._inbox}.{next(self._tokens)}"
                self._rounds[subject] = (round_, index)
                subjects.append(subject)
                await client.publish(held.msg.reply, verb, reply=subject)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await round_.all_answered
        except nats.errors.Error as error:  # not sent (closed, or its buffer full): again
            log.debug("could not send %d ack verbs: %r", len(verbs), error)
        finally:
            for subject in subjects:
                self._rounds.pop(subject, None)
        return [verbs[index] for index in round_.unanswered()]

    async def _on_reply(self, msg: Msg) -> None:
        found = self._rounds.pop(msg.subject, None)
        if found is not None:
            self.answered = time.monotonic()
            found[0].answer(found[1])

    def _give_up(self, verbs: list[tuple[Held, bytes]]) -> None:
        if verbs:
            names = sorted({verb.split()[0].decode() for _, verb in verbs})
            log.warning(
                "no confirmation for %d %s verbs (%s, ...): JetStream will redeliver them",
                len(verbs),
                "/".join(names),
                verbs[0][0].msg.subject,
            )

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if not self._batches and not self._acks:
            self._idle.set()


class _Round:
    """The replies awaited for one send of a batch's verbs."""

    __slots__ = ("_answered", "_left", "all_answered")

    def __init__(self, count: int) -> None:
        self._answered = [False] * count
        self._left = count
        self.all_answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not count:
            self.all_answered.set_result(None)

    def answer(self, index: int) -> None:
        if not self._answered[index]:
            self._answered[index] = True
            self._left -= 1
            if not self._left and not self.all_answered.done():
                self.all_answered.set_result(None)

    def unanswered(self) -> list[int]:
        return [index for index, answered in enumerate(self._answered) if not answered]
