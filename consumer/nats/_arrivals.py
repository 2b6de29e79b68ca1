"""The messages a NATS source received and has not handed out yet, and their order.

`Arrivals` keeps one queue per priority level (one without `routing.priorities`): within a
level, messages are handed out in the order they arrived (a partition consumer sends one at
a time, so a key's jobs stay in publish order); among levels, by `worker.priority_weights`
(`consumer.runtime.PriorityLevels`, smooth weighted round robin among the levels with a
message waiting). A high message that arrives while the worker is full of low ones is
therefore handed out at the next free slot, not behind the low ones received before it.
"""

from __future__ import annotations

from collections import deque

from consumer.core import Settings
from consumer.nats._held import Held
from consumer.runtime import PriorityLevels


class Arrivals:
    """Received, not yet handed out: per level, in arrival order."""

    __slots__ = ("_queues", "_turns")

    def __init__(self, settings: Settings) -> None:
        self._turns = PriorityLevels(settings, ())
        self._queues: list[deque[Held]] = [deque() for _ in range(self._turns.count)]

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def __bool__(self) -> bool:
        return any(self._queues)

    def append(self, held: Held) -> None:
        self._queues[held.puller.level].append(held)

    def take(self, count: int) -> list[Held]:
        """Up to `count` messages not settled meanwhile (a redelivery replaced them), in
        the weighted order among levels."""
        queues, taken = self._queues, list[Held]()
        if len(queues) == 1:
            queue = queues[0]
            while queue and len(taken) < count:
                held = queue.popleft()
                if not held.done:
                    taken.append(held)
            return taken
        while len(taken) < count:
            level = self._turns.pick([bool(queue) for queue in queues])
            if level is None:
                break
            held = queues[level].popleft()
            if not held.done:
                taken.append(held)
        return taken
