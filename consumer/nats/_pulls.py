"""How many messages a NATS source asks of which durable consumer.

`PullRequests` owns the pull requests of one source and their accounting:

- At most as many messages are asked for (pull requests with a batch size) as the runtime
  has room for, so a backlog never grows memory; the consumer's `max_ack_pending` bounds
  what the whole group holds unacknowledged (G4).
- With `jetstream.key_partitions` = N, jobs live on `<subject>.<n>` and each of the N
  partition consumers has `max_ack_pending = 1`: it is asked for one message at a time, once
  its last one settled (round-robin among them), so one job per partition runs at a time in
  the whole group, in stream order, and jobs of one key run in publish order (G3). The main
  consumer gets the rest of the room.
- Pull requests do not survive a reconnect, and one unanswered past its expiry was lost.
  A refused one (409) makes that consumer wait `_BACKOFF_S` before it is asked again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NatsClient

from consumer.core import Settings
from consumer.nats._held import Puller

log = logging.getLogger("jobstream.nats")

_API = "$JS.API"
_GRACE_S = 2.0  # a pull request unanswered this long past its expiry was lost (reconnect)
_BACKOFF_S = 1.0  # after a pull request was refused (409), before asking that consumer again


class PullRequests:
    """Pull requests to `pullers` (the main consumer first, then the partition consumers)."""

    def __init__(self, settings: Settings, pullers: Sequence[Puller]) -> None:
        self._settings = settings
        self._pullers = pullers
        self._next = 0  # round-robin start among partition pullers
        self._reconnects = 0

    async def top_up(self, client: NatsClient, room: int) -> None:
        """Ask for more messages, so that asked for <= `room` (what has not arrived yet)."""
        now = time.monotonic()
        reconnects = client.stats["reconnects"]
        if reconnects != self._reconnects:  # pull requests do not survive a reconnect
            self._reconnects = reconnects
            for puller in self._pullers:
                puller.requests.clear()
        for puller in self._pullers:
            puller.expire(now)
        budget = room - sum(p.outstanding for p in self._pullers)
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

    def received(self, puller: Puller) -> None:
        """A message arrived for the oldest pull request to `puller`."""
        if puller.requests:
            puller.requests[0][0] -= 1
            if puller.requests[0][0] <= 0:
                puller.requests.popleft()

    def ended(self, puller: Puller, status: str, headers: dict[str, str] | None) -> bool:
        """The oldest pull request to `puller` was answered with a `status` (not 100, an
        idle heartbeat); True if that says the consumer is gone."""
        # 404/408: the oldest request ended (expired); 409: it was refused.
        if puller.requests:
            puller.requests.popleft()
        if status == "409":
            description = headers.get("Description", "") if headers else ""
            log.warning("pull from %s refused: %s", puller.consumer, description)
            puller.not_before = time.monotonic() + _BACKOFF_S
            return description == "Consumer Deleted"
        return status == "503"  # no responders: the consumer (or JetStream) is gone

    async def _pull(self, client: NatsClient, puller: Puller, batch: int) -> int:
        jet = self._settings.jetstream
        request = {"batch": batch, "expires": int(jet.pull_expires_s * 1e9)}
        subject = f"{_API}.CONSUMER.MSG.NEXT.{self._settings.routing.stream}.{puller.consumer}"
        try:
            await client.publish(subject, json.dumps(request).encode(), reply=puller.inbox)
        except nats.errors.Error as error:
            log.debug("pull request to %s failed: %r", puller.consumer, error)
            return 0
        deadline = time.monotonic() + jet.pull_expires_s + _GRACE_S
        puller.requests.append([float(batch), deadline])
        return batch
