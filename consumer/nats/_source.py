"""NATS JetStream as a `Source`: durable pull consumers shared by a group, acks after settle.

Every worker of a group pulls from the same durable consumer(s), named after the group, with
explicit acks (docs/nats.md):

- At most as many messages are asked for (pull requests with a batch size) as the runtime
  has room for, so a backlog never grows memory; the consumer's `max_ack_pending` bounds
  what the whole group holds unacknowledged (G4).
- A message is acknowledged only once its job settled (G2), and the ack is confirmed by the
  server (a request, the "double ack"), so a settled job is one whose ack JetStream took.
  Completed, duplicate, failed and cancelled jobs are acked; a dead-lettered job is
  terminated (`+TERM`) after the dead-letter stream stored its copy; a retry was already
  handed back by the failure router with `nak(delay)`, never a bare `nak`.
- Every fetched, unsettled message gets an `in_progress` heartbeat every
  `jetstream.heartbeat_s`, so a job longer than the ack wait is not redelivered while it
  runs. A message whose ack wait ran out anyway (a long disconnect) is no longer ours
  (`owns` is false): JetStream has redelivered it, and its result is not settled here.
- Attempts are deliveries: `JobAttributes.attempt` is the JetStream delivery count. A
  redelivered job's first failure is read from the KV bucket the failure router wrote it
  to (`_first_failures`), so its retry budget counts from that failure.
- The last delivery JetStream makes of a message (`num_delivered` = the consumer's
  `max_deliver`) is not run: it is dead-lettered (`max-deliveries`) through the failure
  router and terminated. Only redeliveries that were not failures (crashes, expired ack
  waits, drain cut-offs) reach it, since a failing job is dead-lettered at `max_attempts`;
  without this it would stay unacknowledged in the stream for ever (issue 13, K10).
- With `jetstream.key_partitions` = N, jobs live on `<subject>.<n>` and each of the N
  partition consumers has `max_ack_pending = 1`: one job per partition at a time in the
  whole group, in stream order, so jobs of one key run in publish order (G3).
- On stop, the messages still held (queued, or cut off by the drain) are handed back with
  a `nak` so that another worker takes them at once instead of after the ack wait.
- A connection lost for good (nats-py gave up reconnecting) makes `fetch` raise
  `WorkerError`: the worker exits non-zero and the orchestrator restarts it (G8).
- A durable consumer deleted on the server (pulls answered `409 Consumer Deleted`, then
  `503`, or a probe finds it missing) is re-created by the next `fetch` from the same plan
  as at start; it delivers the stream again from its start (the idempotency store skips
  what was done). If JetStream refuses it, `fetch` raises `WorkerError` (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from consumer.core import Delivery, Outcome, RevokeCallback, Settings, WorkerError
from consumer.nats._first_failures import FirstFailures
from consumer.nats._held import Held, Puller, redelivered
from consumer.nats._provision import (
    consumer_plan,
    ensure_consumers,
    ensure_key_partitions,
    max_deliver,
    stream_destinations,
)
from consumer.runtime import until_reachable
from consumer.telemetry import Backlog
from producer.nats import KEY_PARTITIONS_METADATA, connect_nats, ensure_nats_stream
from producer.retrying import Backoff, retry
from schemas import JobAttributes, JobDecodeError, from_nats

log = logging.getLogger("jobstream.nats")

_ACK, _TERM, _NAK = b"+ACK", b"+TERM", b"-NAK"
_API = "$JS.API"
_GRACE_S = 2.0  # a pull request unanswered this long past its expiry was lost (reconnect)
_BACKOFF_S = 1.0  # after a pull request was refused (409), before asking that consumer again
_CONFIRM_TIMEOUT_S = 2.0  # for one ack confirmation; acks are retried until the ack wait ends
_CONFIRM_BACKOFF = Backoff(initial_s=0.1, max_s=2.0)
_CONSUMER_NOT_FOUND = 10014  # JetStream's error code; a missing stream is another


class NatsSource:
    """A member of the group `settings.worker.group` pulling jobs of `subjects`."""

    def __init__(self, settings: Settings, subjects: Sequence[str]) -> None:
        self._settings = settings
        self._jet = settings.jetstream
        self._subjects = sorted(subjects)
        self._plan = consumer_plan(settings, self._subjects)
        self._pullers = [
            Puller(config.name or "", partitioned=index > 0)
            for index, config in enumerate(self._plan)
        ]
        self._client: NatsClient | None = None
        self._held: dict[int, Held] = {}
        self._arrived: deque[Held] = deque()
        self._wake = asyncio.Event()
        self._acks: deque[tuple[Held, bytes]] = deque()
        self._ack_wake = asyncio.Event()
        self._acks_idle = asyncio.Event()
        self._acks_idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False
        self._contact = time.monotonic()  # JetStream's last answer (see `last_contact`)
        self._lost: set[Puller] = set()  # consumers found deleted, re-created by `fetch`
        self._restore_not_before = 0.0
        self._next = 0  # round-robin start among partition pullers
        self._reconnects = 0
        self._first_failures = FirstFailures(settings)
        self._max_deliver = max_deliver(settings)
        self._last_delivery: Callable[[Delivery], Awaitable[object]] | None = None
        self._dead_lettering: set[asyncio.Task[None]] = set()
        self._dead_letter_failed: BaseException | None = None

    # -- Source ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._started and self._client is not None and self._client.is_connected

    @property
    def consumers(self) -> list[str]:
        return [puller.consumer for puller in self._pullers]

    async def start(self, on_revoke: RevokeCallback) -> None:
        # JetStream has no partition assignment, hence nothing is ever revoked.
        client = await until_reachable(self._settings, lambda: connect_nats(self._settings.nats))
        self._client = client
        try:
            js = client.jetstream(timeout=self._settings.nats.publish_timeout_s)
            await self._check_stream(js)
            await ensure_consumers(js, self._settings, self._subjects)
            await self._first_failures.open(js)
            for puller in self._pullers:
                puller.inbox = client.new_inbox()
                puller.subscription = await client.subscribe(
                    puller.inbox, cb=functools.partial(self._on_message, puller)
                )
        except BaseException:
            await client.close()  # the runtime calls stop() only after a successful start
            raise
        self._tasks = [
            asyncio.create_task(self._heartbeats(), name="jobstream-nats-heartbeats"),
            asyncio.create_task(self._acknowledge(), name="jobstream-nats-acks"),
        ]
        self._started = True
        log.info("pulling %s from %s", ", ".join(self._subjects), ", ".join(self.consumers))

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        self._raise_if_lost()
        if max_records <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._arrived:
            self._wake.clear()
            await self._top_up(max_records)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            self._raise_if_lost()
        taken: list[Held] = []
        while self._arrived and len(taken) < max_records:
            held = self._arrived.popleft()
            if not held.done:
                taken.append(held)
        again = [held for held in taken if held.delivered > 1]  # no I/O for first deliveries
        recalled: dict[int, str | None] = {}
        if again:
            found = await asyncio.gather(*(self._first_failures.recall(held) for held in again))
            recalled = {held.seq: first for held, first in zip(again, found, strict=True)}
        deliveries: list[Delivery] = []
        for held in taken:
            if held.done:  # its ack wait ran out while the first failures were read
                continue
            delivery = self._delivery(held, recalled.get(held.seq))
            if held.delivered >= self._max_deliver and self._last_delivery is not None:
                self._dead_letter_last(delivery, self._last_delivery)
            else:
                deliveries.append(delivery)
        if taken:
            await self._top_up(max_records - len(deliveries))
        return deliveries

    def pause(self) -> None:
        """Nothing to do: JetStream sends only what was asked for, and `fetch` asks for no
        more than the runtime has room for."""

    def resume(self) -> None:
        """See `pause`."""

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        held = self._ours(delivery)
        if held is None or held.settling:
            return
        if outcome is Outcome.RETRYING:  # the router handed it back with nak(delay)
            self._forget(held)
            return
        held.settling = True
        self._acks.append((held, _TERM if outcome is Outcome.DEAD_LETTERED else _ACK))
        self._acks_idle.clear()
        self._ack_wake.set()

    def pending_commits(self) -> int:
        return 0  # acks are sent as jobs settle; there is nothing to batch

    async def commit(self) -> None:
        """Wait (bounded) until the acks of every settled job were confirmed."""
        try:
            async with asyncio.timeout(self._settings.nats.publish_timeout_s):
                await self._acks_idle.wait()
        except TimeoutError:
            waiting = sum(1 for held in self._held.values() if held.settling)
            log.warning("%d acks unconfirmed: those jobs may be redelivered", waiting)

    def owns(self, delivery: Delivery) -> bool:
        held = self._ours(delivery)
        return held is not None and time.monotonic() < held.deadline

    async def backlog(self) -> list[Backlog]:
        """Per consumer of the group: messages not delivered yet plus delivered and not
        acknowledged (retries waiting for their redelivery included). The consumers are
        shared, so every worker of the group reports the same numbers: aggregate with max."""
        client = self._client
        if client is None or not client.is_connected:
            return []
        js = client.jetstream(timeout=1.0)
        found: list[Backlog] = []
        for puller in self._pullers:
            try:
                info = await js.consumer_info(self._settings.routing.stream, puller.consumer)
            except nats.errors.Error:
                continue
            waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)
            found.append(Backlog(self._settings.routing.stream, puller.consumer, waiting))
        return found

    @property
    def last_contact(self) -> float:
        """When JetStream last answered (`time.monotonic()`): a message, a pull request's
        end (404/408), an ack confirmation or a probe. A refused pull (409, 503) is none."""
        return self._contact

    async def probe(self) -> None:
        """Ask JetStream for the info of every consumer of the group: an answer while no
        pull is under way (the worker is full); a consumer missing is re-created by `fetch`."""
        client = self._client
        if client is None or not client.is_connected:
            return
        js = client.jetstream(timeout=self._settings.nats.publish_timeout_s)
        for puller in self._pullers:
            try:
                await js.consumer_info(self._settings.routing.stream, puller.consumer)
            except NotFoundError as error:
                if error.err_code == _CONSUMER_NOT_FOUND:
                    self._lost.add(puller)
                    self._wake.set()
                return
        self._contact = time.monotonic()

    async def _restore(self, client: NatsClient) -> None:
        """Re-create the consumers found deleted, from the plan used at start (`WorkerError`
        if JetStream refuses); at most once a `_BACKOFF_S`."""
        now = time.monotonic()
        if now < self._restore_not_before:
            return
        self._restore_not_before = now + _BACKOFF_S
        js = client.jetstream(timeout=self._settings.nats.publish_timeout_s)
        missing: list[str] = []
        try:
            for puller in list(self._lost):
                try:
                    await js.consumer_info(self._settings.routing.stream, puller.consumer)
                except NotFoundError as error:
                    if error.err_code != _CONSUMER_NOT_FOUND:
                        raise  # the stream is not there (yet): retried
                    missing.append(puller.consumer)
                else:
                    self._lost.discard(puller)  # a 503 while JetStream was away: it is there
            if missing:
                log.warning(
                    "JetStream consumer %s of stream %s is gone (deleted on the server): "
                    "re-creating it; it delivers the stream again from its start and the "
                    "idempotency store skips the jobs already done",
                    ", ".join(missing),
                    self._settings.routing.stream,
                )
                await ensure_consumers(js, self._settings, self._subjects)
        except nats.errors.Error as error:  # no answer: JetStream is not back yet
            log.debug("checking the consumers failed, will retry: %r", error)
            return
        for puller in self._lost:
            puller.requests.clear()  # asked of the deleted consumer: never answered
        self._lost.clear()

    async def stop(self) -> None:
        if self._dead_lettering:  # bounded: a message nak'ed on its last delivery is lost
            await asyncio.wait(self._dead_lettering, timeout=self._settings.worker.drain_timeout_s)
        self._stopping = True
        tasks = [*self._tasks, *self._ack_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client = self._client
        if client is None or client.is_closed:
            return
        for puller in self._pullers:  # no interest: the server drops our pull requests
            if puller.subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await puller.subscription.unsubscribe()
        back = [held for held in self._held.values() if not held.settling and not held.done]
        if back:
            # Another worker takes these now instead of after the ack wait. A redelivery
            # counts as a delivery either way.
            await asyncio.gather(*(self._confirm(held, _NAK) for held in back))
            log.info("handed %d unfinished jobs back to JetStream", len(back))
        await client.close()

    # -- for the failure router --------------------------------------------------------

    async def remember_first_failure(self, delivery: Delivery, stamp: str) -> None:
        """Record `stamp` as the job's first failure, for its redeliveries (before the nak)."""
        held = self._ours(delivery)
        if held is not None:
            await self._first_failures.remember(held, stamp)

    def on_last_delivery(self, dead_letter: Callable[[Delivery], Awaitable[object]]) -> None:
        """Dead-letter each message on its last delivery (`max_deliver`) with `dead_letter`
        instead of handing it out; the source terminates it once that returned."""
        self._last_delivery = dead_letter

    def _dead_letter_last(
        self, delivery: Delivery, dead_letter: Callable[[Delivery], Awaitable[object]]
    ) -> None:
        async def run() -> None:
            await dead_letter(delivery)
            self.settle(delivery, Outcome.DEAD_LETTERED)

        task = asyncio.create_task(run(), name="jobstream-nats-max-deliveries")
        self._dead_lettering.add(task)
        task.add_done_callback(self._dead_lettered)

    def _dead_lettered(self, task: asyncio.Task[None]) -> None:
        self._dead_lettering.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._dead_letter_failed = self._dead_letter_failed or task.exception()

    async def nak(self, delivery: Delivery, delay_s: float) -> bool:
        """Hand the message back for a redelivery in `delay_s` (confirmed). False if it
        could not be confirmed: then the ack wait brings it back."""
        held = self._ours(delivery)
        if held is None:
            return False
        held.settling = True  # a heartbeat now would restart the ack wait and void the delay
        verb = _NAK + b" " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        try:
            return await self._confirm(held, verb)
        finally:
            self._forget(held)

    def main_subject(self, delivery: Delivery) -> str:
        """The job type's subject (`<subject>` for a message read from `<subject>.<n>`)."""
        partitioned = any(p.partitioned and p.name == delivery.partition for p in self._pullers)
        return delivery.topic.rpartition(".")[0] if partitioned else delivery.topic

    # -- internals ---------------------------------------------------------------------

    async def _check_stream(self, js: JetStreamContext) -> None:
        stream, wanted = self._settings.routing.stream, self._jet.key_partitions
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            if not self._settings.create_missing:
                msg = (
                    f"stream {stream!r} does not exist: "
                    "run `jobstream topics ensure --transport nats`"
                )
                raise WorkerError(msg) from None
            destinations = stream_destinations(self._settings, self._subjects)
            await ensure_nats_stream(js, destinations, self._settings.routing)
            await ensure_key_partitions(js, self._settings)
            return
        found = int((info.config.metadata or {}).get(KEY_PARTITIONS_METADATA, "0"))
        if found != wanted:
            msg = (
                f"stream {stream!r} is partitioned into {found} key partitions but "
                f"JOBSTREAM_JETSTREAM__KEY_PARTITIONS={wanted}: set the same number everywhere "
                "and run `jobstream topics ensure --transport nats`"
            )
            raise WorkerError(msg)

    def _raise_if_lost(self) -> None:
        if self._dead_letter_failed is not None:
            error = self._dead_letter_failed
            msg = f"a message on its last delivery could not be dead-lettered: {error}"
            raise WorkerError(msg) from error
        client = self._client
        if client is not None and client.is_closed and not self._stopping:
            nats_settings = self._settings.nats
            msg = (
                f"lost the connection to NATS at {', '.join(nats_settings.servers)} and gave up "
                f"after {nats_settings.max_reconnect_attempts} reconnect attempts "
                f"{nats_settings.reconnect_wait_s:g}s apart (nats.max_reconnect_attempts): "
                "check the server; jobs not acknowledged will be redelivered"
            )
            raise WorkerError(msg)

    async def _top_up(self, room: int) -> None:
        """Ask for more messages, so that arrived + asked for <= room."""
        client = self._client
        if client is None or not client.is_connected:
            return
        if self._lost:
            await self._restore(client)
            if self._lost:
                return
        now = time.monotonic()
        reconnects = client.stats["reconnects"]
        if reconnects != self._reconnects:  # pull requests do not survive a reconnect
            self._reconnects = reconnects
            for puller in self._pullers:
                puller.requests.clear()
        for puller in self._pullers:
            puller.expire(now)
        budget = room - len(self._arrived) - sum(p.outstanding for p in self._pullers)
        main, partitions = self._pullers[0], self._pullers[1:]
        count = len(partitions)
        for i in range(count):
            if budget <= 0:
                break
            puller = partitions[(self._next + i) % count]
            # max_ack_pending is 1: asking again before this one settled would only wait.
            if not puller.requests and not puller.unsettled and puller.not_before <= now:
                budget -= await self._pull(client, puller, 1)
        self._next += 1
        want = min(budget, self._settings.worker.fetch_max_records) - main.outstanding
        if want > 0 and main.not_before <= now and (not main.requests or want >= 16):
            await self._pull(client, main, want)

    async def _pull(self, client: NatsClient, puller: Puller, batch: int) -> int:
        request = {"batch": batch, "expires": int(self._jet.pull_expires_s * 1e9)}
        subject = f"{_API}.CONSUMER.MSG.NEXT.{self._settings.routing.stream}.{puller.consumer}"
        try:
            await client.publish(subject, json.dumps(request).encode(), reply=puller.inbox)
        except nats.errors.Error as error:
            log.debug("pull request to %s failed: %r", puller.consumer, error)
            return 0
        deadline = time.monotonic() + self._jet.pull_expires_s + _GRACE_S
        puller.requests.append([float(batch), deadline])
        return batch

    async def _on_message(self, puller: Puller, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status not in ("409", "503"):  # refused, or no consumer to answer: no contact
            self._contact = time.monotonic()
        if status is not None:
            if status == "100":  # idle heartbeat
                return
            # 404/408: the oldest request ended (expired); 409: it was refused.
            if puller.requests:
                puller.requests.popleft()
            if status == "409":
                description = msg.headers.get("Description", "") if msg.headers else ""
                log.warning("pull from %s refused: %s", puller.consumer, description)
                puller.not_before = time.monotonic() + _BACKOFF_S
                if description == "Consumer Deleted":
                    self._lost.add(puller)
            elif status == "503":  # no responders: the consumer (or JetStream) is gone
                self._lost.add(puller)
            self._wake.set()
            return
        if puller.requests:
            puller.requests[0][0] -= 1
            if puller.requests[0][0] <= 0:
                puller.requests.popleft()
        meta = msg.metadata
        held = Held(
            msg=msg,
            puller=puller,
            seq=meta.sequence.stream,
            delivered=meta.num_delivered,
            stored=meta.timestamp,
            deadline=time.monotonic() + self._jet.ack_wait_s,
        )
        earlier = self._held.get(held.seq)
        if earlier is not None:  # its ack wait ran out while we held it; this is the redelivery
            self._forget(earlier)
        self._held[held.seq] = held
        puller.unsettled += 1
        self._arrived.append(held)
        self._wake.set()

    def _delivery(self, held: Held, first_failure: str | None) -> Delivery:
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

    def _ours(self, delivery: Delivery) -> Held | None:
        held = self._held.get(delivery.offset)
        return held if held is not None and held.msg is delivery.handle else None

    def _forget(self, held: Held) -> None:
        if held.done:
            return
        held.done = True
        held.puller.unsettled -= 1
        if self._held.get(held.seq) is held:
            del self._held[held.seq]
        self._wake.set()  # a partition consumer may be asked for its next message

    async def _confirm(self, held: Held, verb: bytes) -> bool:
        """Send an ack verb and wait for the server's confirmation, retrying until the ack
        wait runs out (after that JetStream redelivers the message anyway)."""
        client = self._client
        assert client is not None
        # Short: a reply lost with a dropped connection is retried, not waited out.
        timeout = min(self._settings.nats.publish_timeout_s, _CONFIRM_TIMEOUT_S)
        try:
            await retry(
                lambda: client.request(held.msg.reply, verb, timeout=timeout),
                on=lambda error: isinstance(error, nats.errors.Error) and not client.is_closed,
                backoff=_CONFIRM_BACKOFF,
                deadline=held.deadline,  # no heartbeat moves it while the verb is under way
            )
            self._contact = time.monotonic()
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
            await self._ack_wake.wait()
            self._ack_wake.clear()
            if self._acks:
                batch = list(self._acks)
                self._acks.clear()
                task = asyncio.create_task(self._confirm_batch(batch))
                self._ack_tasks.add(task)
                task.add_done_callback(self._ack_batch_done)

    async def _confirm_batch(self, batch: list[tuple[Held, bytes]]) -> None:
        await asyncio.gather(*(self._confirm(held, verb) for held, verb in batch))
        for held, _ in batch:
            self._forget(held)

    def _ack_batch_done(self, task: asyncio.Task[None]) -> None:
        self._ack_tasks.discard(task)
        if not self._ack_tasks and not self._acks:
            self._acks_idle.set()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._jet.heartbeat_s)
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
                held.deadline = now + self._jet.ack_wait_s
