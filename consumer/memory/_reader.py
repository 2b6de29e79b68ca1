"""What a `MemorySource` reads from the partitions it owns: where each stands, which ones
wait at a record that is not due yet, and, with `routing.priorities`, what each level
holds in hand.

Reading starts with a different partition at each fetch. A record not due yet is planned
by `MemoryTiers` (its partition waits at it, it is copied to a tier, or held in memory);
every record read is tracked by the source's `OffsetTracker`, and a partition holds at
most `worker.max_held_offsets` records behind its oldest unsettled one (K7).

With priorities, each level's partitions are read into a hand of their own, topped up to
what the worker asked for, and the deliveries are taken by weighted turns among the levels
holding some (`consumer.runtime.PriorityLevels`, docs/scheduling.md "Priorities"): what is
left in hand is tracked and waits for the next fetch, or is dropped with its partition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

from consumer.core import MAX_DELAY_S, DelayTooLong, Delivery, Settings
from consumer.memory._tiers import MemoryTiers
from consumer.runtime import OffsetTracker, PriorityLevels
from producer.memory import MemoryBroker, MemoryRecord, TopicPartition
from schemas import JobDecodeError, from_kafka

__all__ = ["PartitionReader"]


class PartitionReader:
    """The read positions of a source's partitions, their waits and the levels' hands."""

    def __init__(
        self,
        broker: MemoryBroker,
        settings: Settings,
        topics: list[str],
        tiers: MemoryTiers,
        tracker: OffsetTracker[TopicPartition],
    ) -> None:
        """`topics`: every topic the source reads (tiers included); `tiers` and `tracker`:
        the source's."""
        self._broker = broker
        self._tiers = tiers
        self._tracker = tracker
        self._max_held = settings.worker.max_held_offsets
        self._levels = PriorityLevels(settings, topics)
        self._hands: list[deque[Delivery]] = [deque() for _ in range(self._levels.count)]
        self.positions: dict[TopicPartition, int] = {}
        """Per partition read: the next offset to read."""
        self._waiting: dict[TopicPartition, float] = {}  # tier partition -> due (loop time)
        self._turn = 0

    def start(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp`, newly owned, from `offset` (the group's committed one)."""
        self.positions[tp] = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Stop reading `partitions`; drop what is in hand of them (read again by their
        next owner)."""
        for tp in partitions:
            self.positions.pop(tp, None)
            self._waiting.pop(tp, None)
        for hand in self._hands:
            if hand:
                kept = [delivery for delivery in hand if delivery.partition not in partitions]
                hand.clear()
                hand.extend(kept)

    def has_news(self) -> bool:
        """Whether a read would find something: records in hand, or past a position of a
        partition that is not waiting."""
        if any(self._hands):
            return True
        end = self._broker.end_offset
        return any(
            tp not in self._waiting and end(tp.topic, tp.partition) > position
            for tp, position in self.positions.items()
        )

    def next_due(self) -> float | None:
        """When (loop time) the first waiting partition or record held in memory is due."""
        dues = list(self._waiting.values())
        if (soon := self._tiers.next_due()) is not None:
            dues.append(soon)
        return min(dues) if dues else None

    def take(
        self, owned: Mapping[TopicPartition, int], max_records: int, now: float
    ) -> list[Delivery]:
        """Up to `max_records` deliveries of the `owned` partitions (-> their assignment's
        epoch), starting with a different partition each time; with priorities, by
        weighted turns among the levels."""
        for tp in [tp for tp, due in self._waiting.items() if due <= now]:
            del self._waiting[tp]
        order = sorted(owned)
        self._turn = (self._turn + 1) % max(len(order), 1)
        order = order[self._turn :] + order[: self._turn]
        wall = datetime.now(UTC)  # with `now`: a delay held in memory ends on time
        deliveries = self._tiers.due(max_records, now)
        if self._levels.count == 1:
            deliveries += self._read(owned, order, max_records - len(deliveries), now, wall)
            return deliveries
        hands, level_of = self._hands, self._levels.of
        for level, hand in enumerate(hands):  # top each hand up to what may be taken
            partitions = [tp for tp in order if level_of[tp.topic] == level]
            hand.extend(self._read(owned, partitions, max_records - len(hand), now, wall))
        ready = [bool(hand) for hand in hands]
        while len(deliveries) < max_records:
            turn = self._levels.pick(ready)
            if turn is None:
                break
            deliveries.append(hands[turn].popleft())
            ready[turn] = bool(hands[turn])
        return deliveries

    def _read(
        self,
        owned: Mapping[TopicPartition, int],
        partitions: list[TopicPartition],
        room: int,
        now: float,
        wall: datetime,
    ) -> list[Delivery]:
        """Up to `room` deliveries read from `partitions`, in turn, tracked; what is not due
        yet is left waiting in its partition, copied to a tier or held in memory."""
        deliveries: list[Delivery] = []
        for tp in partitions:
            left = room - len(deliveries)
            if left <= 0:
                break
            if tp in self._waiting:
                continue
            # Bound what one partition holds behind its oldest unsettled record (K7).
            left = min(left, self._max_held - self._tracker.held(tp))
            if left <= 0:
                continue
            for record in self._broker.read(tp.topic, tp.partition, self.positions[tp], left):
                delivery = _delivery(tp, record, owned[tp])
                plan = self._tiers.plan(tp, record, delivery, wall)
                if plan.action == "wait":
                    self._waiting[tp] = now + plan.seconds
                    break
                self._tracker.track(tp, record.offset)
                self.positions[tp] = record.offset + 1
                if plan.action == "move":
                    self._tiers.copy(tp, record, plan.tier, owned[tp])
                elif plan.action == "hold":
                    self._tiers.hold(now + plan.seconds, delivery)
                elif plan.action == "too-long":
                    too_long = DelayTooLong(plan.seconds, MAX_DELAY_S)
                    deliveries.append(replace(delivery, attributes=None, error=too_long))
                else:
                    deliveries.append(delivery)
        return deliveries


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
