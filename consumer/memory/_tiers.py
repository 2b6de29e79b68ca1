"""The memory source's records that are not due yet, as on Kafka (`consumer.core.plan_delay`,
docs/scheduling.md): where each waits, the copies to a tier under way, and the last
stretch held in memory.

A tier record's partition waits, at that record, until it is due, at most its tier's
delay after it was appended (the source keeps the partition's wait); a delayed job on a
main topic, or a tier record released before it is due, is appended unchanged to the
largest tier at most its remaining time, its offset settled once the broker stored the
copy (issue 13, K9; issue 15); its last stretch, under the first tier's delay, is held in
memory with its offset unsettled. A priority level's topic shares its normal topic's
tiers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Sequence
from datetime import datetime

from consumer.core import (
    Deferrals,
    DelayPlan,
    Delivery,
    Settings,
    WorkerError,
    plan_delay,
    remaining_s,
)
from consumer.runtime import until_acknowledged
from producer import destination_level
from producer.memory import MemoryBroker, MemoryPublisher, MemoryRecord, TopicPartition

__all__ = ["MemoryTiers"]

_RUN_NOW = DelayPlan("run")
Settle = Callable[[TopicPartition, int, int], None]
"""The source's: settle (partition, offset) if the partition is still owned under the
epoch (its assignment) the record was read in."""


class MemoryTiers:
    """The tier topics of a source's topics, the records held in memory until due, and
    the copies to a tier under way."""

    def __init__(
        self, broker: MemoryBroker, settings: Settings, topics: Sequence[str], settle: Settle
    ) -> None:
        retry = settings.retry
        self._broker = broker
        self._settings = settings
        self._settle = settle
        self.deferrals = Deferrals()
        """Delayed first attempts read from a main topic and set aside (`scheduled`)."""
        self._delays: dict[str, float] = {}  # tier topic -> its delay
        self._tier_topics: dict[str, list[str]] = {}  # main or tier topic -> its tiers
        for topic in topics:
            tiers = retry.tier_topics(destination_level(topic)[0])
            self._delays.update(zip(tiers, retry.tiers_s, strict=True))
            for name in (topic, *tiers):
                self._tier_topics[name] = tiers
        self.topics = frozenset(self._delays)
        """The tier topics of every main topic (of its normal level's topic)."""
        self._soon: list[tuple[float, int, Delivery]] = []  # held in memory: (due, loop time)
        self._order = itertools.count()
        self._requeuing: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None

    def raise_if_failed(self) -> None:
        """Raise `WorkerError` once a copy to a tier failed (its hand-off timed out)."""
        if self._failed is not None:
            msg = f"a retry record could not be appended to its tier again: {self._failed}"
            raise WorkerError(msg) from self._failed

    def plan(
        self, tp: TopicPartition, record: MemoryRecord, delivery: Delivery, wall: datetime
    ) -> DelayPlan:
        """Where a record waits (`consumer.core.plan_delay`): a tier record in its
        partition until due, at most its tier's delay after it was appended; past that, or
        a main-topic record due later, in the largest tier at most its remaining time,
        or in memory for its last stretch."""
        remaining = remaining_s(delivery.attributes, wall)
        if remaining <= 0:
            return _RUN_NOW
        tier_s = self._delays.get(tp.topic)
        released_in = None
        if tier_s is not None:
            released_in = min((record.timestamp - wall).total_seconds() + tier_s, tier_s)
        tiers = [] if self._settings.retry.in_place else self._settings.retry.tiers_s
        plan = plan_delay(remaining, tiers, released_in=released_in)
        if tier_s is None and plan.action in ("move", "hold"):
            self.deferrals.add(delivery.attributes)
        return plan

    def hold(self, due: float, delivery: Delivery) -> None:
        """Hold `delivery` in memory until `due` (loop time)."""
        heapq.heappush(self._soon, (due, next(self._order), delivery))

    def due(self, max_records: int, now: float) -> list[Delivery]:
        """Up to `max_records` of the records held in memory that are due at `now`."""
        found: list[Delivery] = []
        while self._soon and self._soon[0][0] <= now and len(found) < max_records:
            found.append(heapq.heappop(self._soon)[2])
        return found

    def next_due(self) -> float | None:
        """When (loop time) the first record held in memory is due (None: none is)."""
        return self._soon[0][0] if self._soon else None

    def copy(self, tp: TopicPartition, record: MemoryRecord, tier: int, epoch: int) -> None:
        """Append `record` to tier `tier` of its topic; settle it once stored."""
        topic = self._tier_topics[tp.topic][tier]
        task = asyncio.create_task(self._append(tp, record, topic, epoch))
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
        self._settle(tp, record.offset, epoch)

    def _requeued(self, task: asyncio.Task[None]) -> None:
        self._requeuing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed = self._failed or task.exception()

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop the records of `partitions` held in memory (unsettled: read again)."""
        kept = [item for item in self._soon if item[2].partition not in partitions]
        if len(kept) != len(self._soon):
            heapq.heapify(kept)
            self._soon = kept

    def cancel(self) -> None:
        """Cancel the copies under way: their records are read again."""
        for task in list(self._requeuing):
            task.cancel()
