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
Kafka: a tier record's partition waits at it while the other partitions flow, and the
rest is copied to a tier or held in memory (`_tiers.py`: `MemoryTiers`). Reading, the
positions and the waits are `_reader.py`'s (`PartitionReader`).

With `routing.priorities` the topics come in three levels, as on Kafka: each level's
partitions are read into a hand of their own (at most what the worker asked for), and
`fetch` hands out by weighted turns among the levels holding records
(`consumer.runtime.PriorityLevels`, docs/scheduling.md "Priorities").

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
import itertools
import logging
from collections.abc import Callable, Sequence

from consumer.core import Delivery, Outcome, RevokeCallback, Settings, WorkerError
from consumer.memory._reader import PartitionReader
from consumer.memory._tiers import MemoryTiers
from consumer.runtime import OffsetTracker
from consumer.telemetry import Backlog
from producer.memory import CommitFailed, MemoryBroker, TopicPartition

__all__ = ["MemorySource", "SettleListener"]

log = logging.getLogger("jobstream.memory")

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
        self._tiers = MemoryTiers(broker, settings, topics, self._settle_copy)
        self.deferrals = self._tiers.deferrals
        self._topics = sorted({*topics, *self._tiers.topics})
        self._group = settings.worker.group
        self._on_settle = on_settle
        self._on_revoke: RevokeCallback | None = None
        self._member: str | None = None
        self._generation = 0
        self._owned: dict[TopicPartition, int] = {}  # partition -> its assignment's epoch
        self._epochs = itertools.count(1)
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._reader = PartitionReader(broker, settings, self._topics, self._tiers, self._tracker)
        self._max_held = settings.worker.max_held_offsets
        self._commit_lock = asyncio.Lock()
        self._ready = False
        self._paused = False
        self._crashed = False

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
        self._tiers.raise_if_failed()
        while not self._crashed and self._member is not None:
            await self._sync()
            if max_records <= 0:
                return []  # a poll that only keeps the membership alive
            if self._broker.faults.connected and not self._paused:
                deliveries = self._reader.take(self._owned, max_records, loop.time())
                if deliveries:
                    return deliveries
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            due = self._reader.next_due()
            if due is not None:  # wake up when the first waiting retry or delayed job is due
                remaining = min(remaining, max(0.0, due - loop.time()))
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
            after = self._broker.end_offset(tp.topic, tp.partition) - self._reader.positions[tp]
            waiting = max(0, after) + self._tracker.unsettled(tp)
            found.append(Backlog(tp.topic, str(tp.partition), waiting))
        return found

    async def stop(self) -> None:
        """Leave the group (the others rebalance); after the runtime's final commit. A copy
        of a retry record still being appended is cancelled: the record is read again."""
        self._tiers.cancel()
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
            self._reader.start(tp, self._broker.committed(group, tp.topic, tp.partition) or 0)
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
        self._reader.forget(partitions)
        self._tiers.forget(partitions)
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
        return self._reader.has_news()

    def _settle_copy(self, tp: TopicPartition, offset: int, epoch: int) -> None:
        """A record copied to a tier: settled, unless revoked meanwhile (the next owner
        reads it again)."""
        if self._owned.get(tp) == epoch:
            self._tracker.settle(tp, offset)
