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
- With `routing.priorities`, each level has its own consumers, and the room is split among
  the levels by `worker.priority_weights` (`consumer.runtime.PriorityLevels`). The room
  goes, one message at a time, to the levels that showed a backlog (their last pull was
  filled), by smooth weighted round robin kept across calls, as `no_wait` pulls: a level
  that runs dry answers at once (404) instead of holding its share of the room until the
  pull expires. Under saturation the messages asked for, hence delivered, follow the
  weights. An idle level (no known backlog) costs the others nothing: it keeps a waiting
  pull of one (highest level first, expiring after `_IDLE_WAIT_S`, so one left standing
  when another level's backlog comes holds its unit briefly) only from room that no level
  with a backlog wants; while a backlog wants the room, the idle level is asked with a
  `no_wait` pull of one every `_PROBE_S` instead (and first of all), which holds its unit
  for a round trip.
  `starved` tells the source that a level with a backlog wanted more than the room of
  the call: room freed since is worth a new call (`NatsSource.fetch`).
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
from consumer.runtime import PriorityLevels

log = logging.getLogger("jobstream.nats")

_API = "$JS.API"
_GRACE_S = 2.0  # a pull request unanswered this long past its expiry was lost (reconnect)
_BACKOFF_S = 1.0  # after a pull request was refused (409), before asking that consumer again
_PROBE_S = 0.1  # between two `no_wait` pulls of one to an idle level while the room is wanted
_IDLE_WAIT_S = 0.5  # most an idle level's waiting pull of one holds its unit of the room


class PullRequests:
    """Pull requests to `pullers` (per level: the main consumer first, then its partition
    consumers)."""

    def __init__(self, settings: Settings, pullers: Sequence[Puller]) -> None:
        self._settings = settings
        self._pullers = pullers
        self._next = 0  # round-robin start among partition pullers
        self._reconnects = 0
        self._turns = PriorityLevels(settings, ())
        self._levels: list[list[Puller]] = [[] for _ in range(self._turns.count)]
        self.starved = False
        """The last `top_up` left a level with a backlog wanting more than its room."""
        for puller in pullers:  # (`planned_consumers` order: the level's main one first)
            self._levels[puller.level].append(puller)

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
        self.starved = False
        if len(self._levels) == 1:
            await self._top_up_level(client, self._levels[0], budget, now)
        else:
            await self._top_up_levels(client, budget, now)
        self._next += 1

    def split(self, budget: int, wants: Sequence[int]) -> list[int]:
        """`budget` messages split among the levels, one at a time by weight (the turn
        carries over to the next call), none beyond what a level `wants`."""
        shares = [0] * len(wants)
        while budget > 0:
            level = self._turns.pick(
                [share < want for share, want in zip(shares, wants, strict=True)]
            )
            if level is None:
                break
            shares[level] += 1
            budget -= 1
        return shares

    async def _top_up_level(
        self, client: NatsClient, pullers: Sequence[Puller], budget: int, now: float
    ) -> None:
        """One level (no priorities): partition consumers first, the main one the rest."""
        main, partitions = pullers[0], pullers[1:]
        count = len(partitions)
        for i in range(count):
            if budget <= 0:
                break
            puller = partitions[(self._next + i) % count]
            # max_ack_pending is 1: asking again before this one settled would only wait.
            if not puller.requests and not puller.unsettled and puller.not_before <= now:
                budget -= await self._pull(client, puller, 1)
        want = min(budget, self._settings.worker.fetch_max_records) - main.outstanding
        if want > 0 and main.not_before <= now and (not main.requests or want >= 16):
            await self._pull(client, main, want)

    async def _top_up_levels(self, client: NatsClient, budget: int, now: float) -> None:
        """Priority levels: the room by weight among the levels with a backlog; an idle
        level keeps a waiting pull of one from the room they leave, else is probed
        (module docstring)."""
        fetch_max = self._settings.worker.fetch_max_records
        wants = []
        for pullers in self._levels:
            free = sum(1 for puller in pullers[1:] if _free(puller, now))
            main = pullers[0] if pullers else None
            if main is not None and main.busy and main.not_before <= now:
                free += max(0, fetch_max - main.outstanding)
            wants.append(free)
        spare = budget - sum(wants)  # the room no level with a backlog wants
        for pullers in self._levels:
            main = pullers[0] if pullers else None
            if main is None or main.busy or main.requests or main.not_before > now:
                continue
            if spare > 0 and main.probe_at > 0.0:
                spare -= 1
                budget -= await self._pull(client, main, 1, wait_s=_IDLE_WAIT_S)
            elif budget > 0 and main.probe_at <= now:
                # A waiting pull would hold a unit a level with a backlog wants, for up
                # to its expiry: look for a message now and then instead. A level never
                # asked is looked at first, so that a worker starting on a backlog
                # leaves no waiting pull of another level standing beside it.
                main.probe_at = now + _PROBE_S
                budget -= await self._pull(client, main, 1, no_wait=True)
        shares = self.split(budget, wants)
        self.starved = sum(shares) < sum(wants)
        for pullers, share in zip(self._levels, shares, strict=True):
            if share > 0:
                await self._ask(client, pullers, share, now)

    async def _ask(
        self, client: NatsClient, pullers: Sequence[Puller], share: int, now: float
    ) -> None:
        """A level's `share`: one to each free partition consumer, the rest to the level's
        main consumer (with a backlog) as a `no_wait` pull."""
        partitions = pullers[1:]
        count = len(partitions)
        for i in range(count):
            puller = partitions[(self._next + i) % count]
            if share > 0 and _free(puller, now):
                share -= await self._pull(client, puller, 1)
        if share > 0 and pullers[0].busy:
            await self._pull(client, pullers[0], share, no_wait=True)

    def received(self, puller: Puller) -> None:
        """A message arrived for the oldest pull request to `puller`."""
        puller.busy = True
        if puller.requests:
            puller.requests[0][0] -= 1
            if puller.requests[0][0] <= 0:
                puller.requests.popleft()

    def ended(self, puller: Puller, status: str, headers: dict[str, str] | None) -> bool:
        """The oldest pull request to `puller` was answered with a `status` (not 100, an
        idle heartbeat); True if that says the consumer is gone."""
        # 404/408: the oldest request ended (no messages left, or expired) before it was
        # filled: the consumer has no backlog now; 409: it was refused.
        if puller.requests:
            puller.requests.popleft()
        puller.busy = False
        if status == "409":
            description = headers.get("Description", "") if headers else ""
            log.warning("pull from %s refused: %s", puller.consumer, description)
            puller.not_before = time.monotonic() + _BACKOFF_S
            return description == "Consumer Deleted"
        return status == "503"  # no responders: the consumer (or JetStream) is gone

    async def _pull(
        self,
        client: NatsClient,
        puller: Puller,
        batch: int,
        *,
        no_wait: bool = False,
        wait_s: float | None = None,
    ) -> int:
        """Ask `puller` for `batch` messages: a pull that waits for them up to `wait_s`
        (at most `jetstream.pull_expires_s`), or (`no_wait`) one answered at once with what
        is there (then 404 if that is fewer). `no_wait` has no expiry: with one, JetStream
        holds the request while messages are unacknowledged."""
        expires_s = self._settings.jetstream.pull_expires_s
        if wait_s is not None:
            expires_s = min(expires_s, wait_s)
        wait_s = 0.0 if no_wait else expires_s
        request: dict[str, object] = {"batch": batch}
        if no_wait:
            request["no_wait"] = True
        else:
            request["expires"] = int(wait_s * 1e9)
        subject = f"{_API}.CONSUMER.MSG.NEXT.{self._settings.routing.stream}.{puller.consumer}"
        try:
            await client.publish(subject, json.dumps(request).encode(), reply=puller.inbox)
        except nats.errors.Error as error:
            log.debug("pull request to %s failed: %r", puller.consumer, error)
            return 0
        deadline = time.monotonic() + wait_s + _GRACE_S
        puller.requests.append([float(batch), deadline])
        return batch


def _free(puller: Puller, now: float) -> bool:
    """A partition consumer that may be asked for its next message (`max_ack_pending` 1:
    asking again before its last one settled would only wait)."""
    return not puller.requests and not puller.unsettled and puller.not_before <= now
