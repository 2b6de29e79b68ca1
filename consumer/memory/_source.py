"""The memory backend's `Source`: a consumer-group member of a `MemoryBroker`, with the
semantics of `KafkaSource`.

The source reads the main topics and their retry tier topics as one member of the group
`worker.group`; several sources (several workers in one process) share the partitions,
dealt round-robin by the broker's group coordinator (`producer/memory/_groups.py`). When
the group changes (a member joins, leaves or crashes; a forced rebalance), each member
finds out on its next fetch, awaits the runtime's `on_revoke` for everything it owns
(the runtime drains those jobs), commits, and only then releases the partitions; it takes
its new ones from the group's committed offsets as soon as their previous owner let go.
A delivery carries the assignment it was fetched under, so a late result of an earlier
assignment never settles (`owns` is False for it).

A record that is not due yet (`jobnotbefore` in the future) is not handed out, as on
Kafka (`consumer.core.plan_delay`, docs/scheduling.md): a tier record's partition waits,
at that record, until it is due, at most its tier's delay after it was appended, while the
other partitions flow; a delayed job on a main topic, or a tier record released before it
is due, is appended unchanged to the largest tier at most its remaining time, its offset
settled once the broker stored the copy (issue 13, K9; issue 15); its last stretch, under
the first tier's delay, is held in memory with its offset unsettled.

Every fetched record is tracked by the `OffsetTracker`; settled records advance the
commit position, and `commit` (batched by the runtime, on revoke, on shutdown) is the only
place that commits. A commit the broker refuses (`CommitFailed`: connection down, or the
partition was revoked meanwhile) is logged; the records after the last commit are
delivered again to the partition's next owner.

Fetching waits on the broker's changes (records, group changes, reconnects), never in a
busy loop: `fetch(n, timeout_s)` returns as soon as there is something to hand out.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from consumer.core import (
    MAX_DELAY_S,
    DelayPlan,
    DelayTooLong,
    Delivery,
    Outcome,
    RevokeCallback,
    Settings,
    WorkerError,
    plan_delay,
    remaining_s,
)
from consumer.runtime import OffsetTracker, until_acknowledged
from consumer.telemetry import Backlog
from producer.memory import (
    CommitFailed,
    MemoryBroker,
    MemoryPublisher,
    MemoryRecord,
    TopicPartition,
)
from schemas import JobDecodeError, from_kafka

__all__ = ["MemorySource", "SettleListener"]

log = logging.getLogger("jobstream.memory")
_RUN_NOW = DelayPlan("run")

SettleListener = Callable[[Delivery, Outcome], None]
"""Called with every delivery a source settles, and its outcome (the test harness)."""


class MemorySource:
    """A member of the consumer group `settings.worker.group` of `broker`, reading `topics`
    and their retry tier topics."""

    def __init__(
        self,
        broker: MemoryBroker,
        settings: Settings,
        topics: Sequence[str],
        *,
        on_settle: SettleListener | None = None,
    ) -> None:
        """`on_settle`: told of every settled delivery (None: nobody)."""
        self._broker = broker
        self._settings = settings
        retry = settings.retry
        self._tier_delays = {
            tier: delay_s
            for topic in topics
            for tier, delay_s in zip(retry.tier_topics(topic), retry.tiers_s, strict=True)
        }
        self._tiers = set(self._tier_delays)
        self._tier_topics = {
            name: retry.tier_topics(topic)
            for topic in topics
            for name in (topic, *retry.tier_topics(topic))
        }
        self._soon: list[tuple[float, int, Delivery]] = []  # held in memory: (due, loop time)
        self._order = itertools.count()
        self._requeuing: set[asyncio.Task[None]] = set()
        self._requeue_failed: BaseException | None = None
        self._topics = sorted({*topics, *self._tiers})
        self._group = settings.worker.group
        self._on_settle = on_settle
        self._on_revoke: RevokeCallback | None = None
        self._member: str | None = None
        self._generation = 0
        self._owned: dict[TopicPartition, int] = {}  # partition -> its assignment's epoch
        self._positions: dict[TopicPartition, int] = {}  # next offset to fetch
        self._waiting: dict[TopicPartition, float] = {}  # tier partition -> due (loop time)
        self._epochs = itertools.count(1)
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._max_held = settings.worker.max_held_offsets
        self._commit_lock = asyncio.Lock()
        self._ready = False
        self._paused = False
        self._crashed = False
        self._turn = 0

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def member(self) -> str | None:
        """This member's id in the group (None before `start` and after `stop`)."""
        return self._member

    @property
    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member owns now."""
        return frozenset(self._owned)

    @property
    def tracker(self) -> OffsetTracker[TopicPartition]:
        return self._tracker

    async def start(self, on_revoke: RevokeCallback) -> None:
        """Join the group (`WorkerError` if the broker stays disconnected for
        `worker.broker_wait_s`); partitions are taken on the next fetches."""
        budget = self._settings.worker.broker_wait_s
        faults = self._broker.faults
        if not await self._broker.wait_until(lambda: faults.connected, budget):
            msg = f"the memory broker stayed disconnected for {budget:g}s: reconnect() it"
            raise WorkerError(msg)
        self._on_revoke = on_revoke
        self._member = self._broker.groups.join(self._group, self._topics)

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._requeue_failed is not None:
            msg = f"a retry record could not be appended to its tier again: {self._requeue_failed}"
            raise WorkerError(msg) from self._requeue_failed
        while not self._crashed and self._member is not None:
            await self._sync()
            if max_records <= 0:
                return []  # a poll that only keeps the membership alive
            if self._broker.faults.connected and not self._paused:
                deliveries = self._take(max_records, loop.time())
                if deliveries:
                    return deliveries
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            dues = list(self._waiting.values())
            if self._soon:
                dues.append(self._soon[0][0])
            if dues:  # wake up when the first waiting retry or delayed job is due
                remaining = min(remaining, max(0.0, min(dues) - loop.time()))
            await self._broker.wait_until(self._has_news, remaining)
        await asyncio.sleep(timeout_s)  # stopped or crashed: nothing comes, but no busy loop
        return []

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        tp = delivery.partition
        if not isinstance(tp, TopicPartition) or not self.owns(delivery):
            return
        try:
            self._tracker.settle(tp, delivery.offset)
        except ValueError:
            log.debug("stale settle ignored: %s", delivery.describe)
            return
        if self._on_settle is not None:
            self._on_settle(delivery, outcome)

    def owns(self, delivery: Delivery) -> bool:
        partition = delivery.partition
        epoch = self._owned.get(partition) if isinstance(partition, TopicPartition) else None
        return not self._crashed and epoch is not None and epoch == delivery.handle

    def pending_commits(self) -> int:
        return self._tracker.pending_commit()

    async def commit(self) -> None:
        if self._crashed or self._member is None:
            return
        async with self._commit_lock:
            positions = self._tracker.committable()
            if not positions:
                return
            try:
                await self._broker.commit_owned(self._group, self._member, positions)
            except CommitFailed as error:
                log.warning("commit failed, records will be redelivered: %s", error)
                return
            self._tracker.mark_committed(positions)

    async def backlog(self) -> list[Backlog]:
        """Per owned partition: records after the fetch position plus those fetched and
        not settled yet (the `jobstream.consumer.lag` metric)."""
        found: list[Backlog] = []
        for tp in sorted(self._owned):
            after = self._broker.end_offset(tp.topic, tp.partition) - self._positions[tp]
            waiting = max(0, after) + self._tracker.unsettled(tp)
            found.append(Backlog(tp.topic, str(tp.partition), waiting))
        return found

    async def stop(self) -> None:
        """Leave the group (the others rebalance); after the runtime's final commit. A copy
        of a retry record still being appended is cancelled: the record is read again."""
        for task in list(self._requeuing):
            task.cancel()
        if self._member is not None and not self._crashed:
            self._broker.groups.leave(self._group, self._member)
            self._forget(set(self._owned))
        self._member, self._ready = None, False

    def crash(self) -> None:
        """Vanish as a killed process does: leave the group without `on_revoke` and
        without a commit; nothing this source fetched settles or commits any more, and the
        records after the group's committed offsets go to the new owners."""
        if self._member is None or self._crashed:
            return
        self._crashed = True
        self._broker.groups.leave(self._group, self._member)
        self._forget(set(self._owned))
        self._ready = False

    # -- group membership ----------------------------------------------------------------

    async def _sync(self) -> None:
        """Follow the group: on a new generation revoke everything (the runtime drains,
        then commit unless the group is being rewound), then take what is assigned and
        free. Kafka's eager protocol."""
        groups, group, member = self._broker.groups, self._group, self._member
        assert member is not None
        while self._generation != groups.generation(group):
            generation = groups.generation(group)
            commit = groups.commit_on_revoke(group, member)
            if self._owned:
                await self._revoke(set(self._owned), commit=commit)
            self._generation = generation
            groups.synced(group, member, generation)
        taken = [
            tp
            for tp in sorted(groups.assignment(group, member))
            if tp not in self._owned and groups.acquire(group, member, tp)
        ]
        for tp in taken:
            self._owned[tp] = next(self._epochs)
            self._positions[tp] = self._broker.committed(group, tp.topic, tp.partition) or 0
        if taken:
            log.info("%s assigned %s", member, [f"{tp.topic}[{tp.partition}]" for tp in taken])
        self._ready = True

    async def _revoke(self, revoked: set[TopicPartition], *, commit: bool) -> None:
        if self._on_revoke is not None:
            await self._on_revoke(sorted(revoked))
        if commit:
            await self.commit()
        self._forget(revoked)
        assert self._member is not None
        self._broker.groups.release(self._group, self._member, revoked)

    def _forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._owned.pop(tp, None)
            self._positions.pop(tp, None)
            self._waiting.pop(tp, None)
        kept = [item for item in self._soon if item[2].partition not in partitions]
        if len(kept) != len(self._soon):
            heapq.heapify(kept)
            self._soon = kept
        self._tracker.forget(partitions)

    def _has_news(self) -> bool:
        """Whether a fetch has something to do now (checked on every broker change)."""
        groups, member = self._broker.groups, self._member
        if self._crashed or member is None:
            return True
        if groups.generation(self._group) != self._generation:
            return True
        assigned = groups.assignment(self._group, member)
        if any(tp not in self._owned and groups.owner(self._group, tp) is None for tp in assigned):
            return True
        if self._paused or not self._broker.faults.connected:
            return False
        end = self._broker.end_offset
        return any(
            tp not in self._waiting and end(tp.topic, tp.partition) > position
            for tp, position in self._positions.items()
        )

    # -- fetching ------------------------------------------------------------------------

    def _take(self, max_records: int, now: float) -> list[Delivery]:
        """Up to `max_records` deliveries, starting with a different partition each time."""
        for tp in [tp for tp, due in self._waiting.items() if due <= now]:
            del self._waiting[tp]
        owned = sorted(self._owned)
        self._turn = (self._turn + 1) % max(len(owned), 1)
        wall = datetime.now(UTC)  # with `now`: a delay held in memory ends on time
        deliveries = self._due(max_records, now)
        for tp in owned[self._turn :] + owned[: self._turn]:
            room = max_records - len(deliveries)
            if room <= 0:
                break
            if tp in self._waiting:
                continue
            # Bound what one partition holds behind its oldest unsettled record (K7).
            room = min(room, self._max_held - self._tracker.held(tp))
            if room <= 0:
                continue
            for record in self._broker.read(tp.topic, tp.partition, self._positions[tp], room):
                delivery = _delivery(tp, record, self._owned[tp])
                plan = self._plan(tp, record, delivery, wall)
                if plan.action == "wait":
                    self._waiting[tp] = now + plan.seconds
                    break
                self._tracker.track(tp, record.offset)
                self._positions[tp] = record.offset + 1
                if plan.action == "move":
                    self._copy(tp, record, self._tier_topics[tp.topic][plan.tier])
                elif plan.action == "hold":
                    heapq.heappush(self._soon, (now + plan.seconds, next(self._order), delivery))
                elif plan.action == "too-long":
                    too_long = DelayTooLong(plan.seconds, MAX_DELAY_S)
                    deliveries.append(replace(delivery, attributes=None, error=too_long))
                else:
                    deliveries.append(delivery)
        return deliveries

    def _due(self, max_records: int, now: float) -> list[Delivery]:
        """Up to `max_records` of the records held in memory that are due at `now`."""
        found: list[Delivery] = []
        while self._soon and self._soon[0][0] <= now and len(found) < max_records:
            found.append(heapq.heappop(self._soon)[2])
        return found

    def _plan(
        self, tp: TopicPartition, record: MemoryRecord, delivery: Delivery, wall: datetime
    ) -> DelayPlan:
        """Where a record waits (`consumer.core.plan_delay`): a tier record in its
        partition until due, at most its tier's delay after it was appended; past that, or
        a main-topic record due later, in the largest tier at most its remaining time,
        or in memory for its last stretch."""
        remaining = remaining_s(delivery.attributes, wall)
        if remaining <= 0:
            return _RUN_NOW
        tier_s = self._tier_delays.get(tp.topic)
        released_in = None
        if tier_s is not None:
            released_in = min((record.timestamp - wall).total_seconds() + tier_s, tier_s)
        tiers = [] if self._settings.retry.in_place else self._settings.retry.tiers_s
        return plan_delay(remaining, tiers, released_in=released_in)

    def _copy(self, tp: TopicPartition, record: MemoryRecord, tier: str) -> None:
        task = asyncio.create_task(self._append(tp, record, tier, self._owned[tp]))
        self._requeuing.add(task)
        task.add_done_callback(self._requeued)

    async def _append(
        self, tp: TopicPartition, record: MemoryRecord, tier: str, epoch: int
    ) -> None:
        publisher = MemoryPublisher(self._broker)
        where = f"{tp.topic}[{tp.partition}]@{record.offset}"
        await until_acknowledged(
            lambda: publisher.send_record(tier, record.key, list(record.headers), record.value),
            self._settings.retry.hand_off_timeout_s,
            where,
        )
        if self._owned.get(tp) == epoch:  # else revoked meanwhile: the next owner reads it
            self._tracker.settle(tp, record.offset)

    def _requeued(self, task: asyncio.Task[None]) -> None:
        self._requeuing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._requeue_failed = self._requeue_failed or task.exception()


def _delivery(tp: TopicPartition, record: MemoryRecord, epoch: int) -> Delivery:
    headers: list[tuple[str, bytes | None]] = list(record.headers)
    try:
        attributes = from_kafka(record.key, headers)
        error: JobDecodeError | None = None
    except JobDecodeError as exc:
        attributes, error = None, exc
    return Delivery(
        partition=tp,
        offset=record.offset,
        topic=tp.topic,
        attributes=attributes,
        body=record.value,
        raw_key=record.key,
        raw_headers=headers,
        error=error,
        handle=epoch,
    )
