"""The records a `KafkaSource` read and has not handed out yet: one FIFO per priority level.

aiokafka returns what it prefetched, often more than the worker has room for; the rest
waits here, in read order per partition. With `routing.priorities` there is a FIFO per
level (`<topic>.priority-high`, the topic and its tiers, `<topic>.priority-low`) and
`take` empties them by weighted round robin (`consumer.runtime.PriorityLevels`); without,
one FIFO, emptied in order at no extra cost.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence, Set
from typing import TypeAlias

from aiokafka import ConsumerRecord, TopicPartition

from consumer.core import Delivery
from consumer.kafka._unreadable import Unreadable
from consumer.runtime import PriorityLevels

Record: TypeAlias = "ConsumerRecord[bytes, bytes] | Unreadable"
HandOut = Callable[[TopicPartition, Record], Delivery | None]
"""The source's: a record taken from the hand as a delivery, or None if not handed out."""


class Hand:
    """Records in hand, per level, and the assigned partitions of each level."""

    __slots__ = ("_levels", "_partitions", "queues")

    def __init__(self, levels: PriorityLevels) -> None:
        self._levels = levels
        self.queues: list[deque[tuple[TopicPartition, Record]]] = [
            deque() for _ in range(levels.count)
        ]
        """One FIFO per level, highest first (one without priorities)."""
        self._partitions: list[list[TopicPartition]] = [[] for _ in self.queues]

    def assigned(self, assignment: Set[TopicPartition]) -> None:
        """Group the partitions of `assignment` by level (after each rebalance)."""
        by_level: list[list[TopicPartition]] = [[] for _ in self.queues]
        for tp in sorted(assignment):
            by_level[self._levels.of[tp.topic]].append(tp)
        self._partitions = by_level

    def short_of(self, bound: int) -> list[TopicPartition] | None:
        """None if every level holds fewer than `bound` records (read every partition);
        else the partitions of the levels that do (empty: read none)."""
        short = [level for level, queue in enumerate(self.queues) if len(queue) < bound]
        if len(short) == len(self.queues):
            return None
        return [tp for level in short for tp in self._partitions[level]]

    def receive(self, tp: TopicPartition, records: Sequence[Record]) -> None:
        self.queues[self._levels.of[tp.topic]].extend((tp, record) for record in records)

    def take(self, max_records: int, hand_out: HandOut, into: list[Delivery]) -> None:
        """Append deliveries to `into` until it holds `max_records` or the hand is empty."""
        queues = self.queues
        if len(queues) == 1:
            queue = queues[0]
            while queue and len(into) < max_records:
                delivery = hand_out(*queue.popleft())
                if delivery is not None:
                    into.append(delivery)
            return
        ready = [bool(queue) for queue in queues]
        while len(into) < max_records:
            level = self._levels.pick(ready)
            if level is None:
                return
            delivery = hand_out(*queues[level].popleft())
            if delivery is not None:
                into.append(delivery)
            ready[level] = bool(queues[level])  # (`hand_out` may drop its partition's rest)

    def drop(self, partitions: Set[TopicPartition]) -> None:
        """Forget what is in hand of `partitions` (rewound, or revoked)."""
        levels = {self._levels.of[tp.topic] for tp in partitions}
        for level in levels:  # in place: `take` may be iterating over the queue
            queue = self.queues[level]
            kept = [item for item in queue if item[0] not in partitions]
            queue.clear()
            queue.extend(kept)

    def counts(self) -> Counter[TopicPartition]:
        """Records in hand per partition."""
        return Counter(tp for queue in self.queues for tp, _ in queue)

    def __bool__(self) -> bool:
        return any(self.queues)
