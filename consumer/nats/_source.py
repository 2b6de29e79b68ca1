"""NATS JetStream as a `Source`: durable pull consumers shared by a group, acks after settle.

Every worker of a group pulls from the same durable consumer(s), named after the group, with
explicit acks (docs/nats.md). `NatsSource` owns the messages it fetched (`Held`, by stream
sequence) from their arrival to their settlement, and composes the parts that own the rest
(each module's docstring says what it guarantees):

- `_pulls.PullRequests`: never more messages asked for than the runtime has room for (G4);
  one at a time per key partition consumer, so jobs of one key run in publish order (G3);
  with `routing.priorities`, one set of consumers per level and the room split among them
  by `worker.priority_weights`; a level without a backlog holds no room another level
  wants.
- `_arrivals.Arrivals`: what was received is handed out in arrival order within a level,
  by weight among levels (a high job never waits behind low ones already received).
- `_confirmations.Confirmations`: a message is acked (completed, duplicate, failed or
  cancelled) only once its job settled (G2), and the ack is confirmed by the server; a
  dead-lettered job is terminated (`+TERM`) after the dead-letter stream stored its copy;
  a retry is a `nak(delay)` from the failure router.
- `_heartbeats.Heartbeats`: `in_progress` for every held, unsettled message, so a long job
  is not redelivered while it runs; one whose ack wait ran out anyway is no longer ours
  (`owns` is false) and its result is not settled here.
- `_deliveries.DeliveryReader` and `_first_failures.FirstFailures`: attempts are JetStream
  deliveries; a redelivered job's retry budget counts from its first failure.
- `_last_deliveries.LastDeliveries`: the last delivery (`max_deliver`) is not run but
  dead-lettered (`max-deliveries`) and terminated (issue 13, K10).
- `_schedules.Schedules`: a delayed job (`not_before` ahead) is not run early but handed
  to JetStream's message scheduler, and acked once the schedule message was stored.
- `_durables.DurableConsumers`: the stream checked at start; a durable consumer deleted on
  the server is re-created by the next `fetch` (`WorkerError` if JetStream refuses).

On stop, the messages still held (queued, or cut off by the drain) are handed back with a
`nak` so that another worker takes them at once instead of after the ack wait. A connection
lost for good (nats-py gave up reconnecting) makes `fetch` raise `WorkerError`: the worker
exits non-zero and the orchestrator restarts it (G8).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from consumer.core import Delivery, Outcome, RevokeCallback, Settings, WorkerError
from consumer.nats._arrivals import Arrivals
from consumer.nats._confirmations import ACK, TERM, Confirmations
from consumer.nats._deliveries import DeliveryReader
from consumer.nats._durables import DurableConsumers
from consumer.nats._first_failures import FirstFailures
from consumer.nats._heartbeats import Heartbeats
from consumer.nats._held import Held, Puller
from consumer.nats._last_deliveries import LastDeliveries
from consumer.nats._provision import max_deliver, planned_consumers
from consumer.nats._pulls import PullRequests
from consumer.nats._schedules import Publish, Schedules
from consumer.runtime import until_reachable
from consumer.telemetry import Backlog
from producer import destination_level
from producer.nats import connect_nats

log = logging.getLogger("jobstream.nats")


class NatsSource:
    """A member of the group `settings.worker.group` pulling jobs of `subjects`."""

    def __init__(self, settings: Settings, subjects: Sequence[str]) -> None:
        self._settings = settings
        self._jet = settings.jetstream
        self._subjects = sorted(subjects)
        self._pullers = [
            Puller(planned.config.name or "", planned.partitioned, planned.level)
            for planned in planned_consumers(settings, self._subjects)
        ]
        self._client: NatsClient | None = None
        self._held: dict[int, Held] = {}
        self._arrived = Arrivals(settings)
        self._wake = asyncio.Event()
        self._settles = 0  # jobs the runtime settled: its room grew (`fetch`)
        self._started = False
        self._stopping = False
        self._contact = time.monotonic()  # JetStream's last answer (see `last_contact`)
        self._pulls = PullRequests(settings, self._pullers)
        self._durables = DurableConsumers(settings, self._subjects, self._pullers, self._wake.set)
        self._confirmations = Confirmations(settings.nats.publish_timeout_s, self._forget)
        self._heartbeats = Heartbeats(
            self._held, self._jet.heartbeat_s, self._jet.ack_wait_s, self._forget
        )
        self._first_failures = FirstFailures(settings)
        self._reader = DeliveryReader(self._first_failures)
        self._last_deliveries = LastDeliveries(max_deliver(settings), self.settle)
        self._schedules = Schedules(settings, self.main_subject, self.settle, self.nak)
        self.deferrals = self._schedules.deferrals

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
            await self._durables.prepare(js)
            await self._first_failures.open(js)
            for puller in self._pullers:
                puller.inbox = client.new_inbox()
                puller.subscription = await client.subscribe(
                    puller.inbox, cb=functools.partial(self._on_message, puller)
                )
        except BaseException:
            await client.close()  # the runtime calls stop() only after a successful start
            raise
        self._heartbeats.start()
        await self._confirmations.start(client)
        self._started = True
        log.info("pulling %s from %s", ", ".join(self._subjects), ", ".join(self.consumers))

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        self._raise_if_lost()
        if max_records <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settles = self._settles
        while not self._arrived:
            self._wake.clear()
            await self._top_up(max_records)
            remaining = deadline - loop.time()
            if remaining <= 0 or (self._pulls.starved and self._settles != settles):
                # A level with a backlog wants more than `max_records`, and jobs settled
                # since the call: the runtime has more room now; let it call again.
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            self._raise_if_lost()
        taken = self._arrived.take(max_records)
        deliveries: list[Delivery] = []
        for delivery in await self._reader.read(taken):
            if self._last_deliveries.take(delivery):
                continue
            due = self._schedules.take(delivery)
            if due is not None:
                deliveries.append(due)
        if taken:
            await self._top_up(max_records - len(deliveries))
        return deliveries

    def pause(self) -> None:
        """Nothing to do: JetStream sends only what was asked for, and `fetch` asks for no
        more than the runtime has room for."""

    def resume(self) -> None:
        """See `pause`."""

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self._settles += 1
        if self._pulls.starved:  # a level with a backlog can use the slot this frees
            self._wake.set()
        held = self._ours(delivery)
        if held is None or held.settling:
            return
        if outcome is Outcome.RETRYING:  # the router handed it back with nak(delay)
            self._forget(held)
            return
        held.settling = True
        self._confirmations.queue(held, TERM if outcome is Outcome.DEAD_LETTERED else ACK)

    def pending_commits(self) -> int:
        return 0  # acks are sent as jobs settle; there is nothing to batch

    async def commit(self) -> None:
        """Wait (bounded) until the acks of every settled job were confirmed."""
        try:
            async with asyncio.timeout(self._settings.nats.publish_timeout_s):
                await self._confirmations.settled()
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
        return await self._durables.backlog(client.jetstream(timeout=1.0))

    @property
    def last_contact(self) -> float:
        """When JetStream last answered (`time.monotonic()`): a message, a pull request's
        end (404/408), an ack confirmation or a probe. A refused pull (409, 503) is none."""
        return max(self._contact, self._confirmations.answered)

    async def probe(self) -> None:
        """Ask JetStream for the info of every consumer of the group: an answer while no
        pull is under way (the worker is full); a consumer missing is re-created by `fetch`."""
        client = self._client
        if client is None or not client.is_connected:
            return
        js = client.jetstream(timeout=self._settings.nats.publish_timeout_s)
        if await self._durables.probe(js):
            self._contact = time.monotonic()

    async def stop(self) -> None:
        await self._last_deliveries.drain(self._settings.worker.drain_timeout_s)
        await self._schedules.drain(self._settings.worker.drain_timeout_s)
        self._stopping = True
        await self._heartbeats.stop()
        await self._confirmations.stop()
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
            await self._confirmations.hand_back(back)
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
        self._last_deliveries.route(dead_letter)

    def schedule_with(self, publish: Publish) -> None:
        """Let JetStream's scheduler hold each delayed job (`not_before` ahead), published
        with `publish`, instead of handing it out early (`_schedules.Schedules`)."""
        self._schedules.publish_with(publish)

    async def nak(self, delivery: Delivery, delay_s: float) -> bool:
        """Hand the message back for a redelivery in `delay_s` (confirmed). False if it
        could not be confirmed: then the ack wait brings it back."""
        held = self._ours(delivery)
        if held is None:
            return False
        held.settling = True  # a heartbeat now would restart the ack wait and void the delay
        try:
            return await self._confirmations.nak(held, delay_s)
        finally:
            self._forget(held)

    def main_subject(self, delivery: Delivery) -> str:
        """The job type's subject (`<subject>` for a message read from `<subject>.<n>`, and
        from a level's `<subject>.priority-<level>[.<n>]`)."""
        partitioned = any(p.partitioned and p.name == delivery.partition for p in self._pullers)
        subject = delivery.topic.rpartition(".")[0] if partitioned else delivery.topic
        return destination_level(subject)[0] if self._settings.routing.priorities else subject

    # -- internals ---------------------------------------------------------------------

    def _raise_if_lost(self) -> None:
        self._last_deliveries.raise_if_failed()
        self._schedules.raise_if_failed()
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
        if self._durables.any_lost:
            await self._durables.restore(client)
            if self._durables.any_lost:
                return
        await self._pulls.top_up(client, room - len(self._arrived))

    async def _on_message(self, puller: Puller, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status not in ("409", "503"):  # refused, or no consumer to answer: no contact
            self._contact = time.monotonic()
        if status is not None:
            if status == "100":  # idle heartbeat
                return
            if self._pulls.ended(puller, status, msg.headers):
                self._durables.mark_lost(puller)
            self._wake.set()
            return
        self._pulls.received(puller)
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
