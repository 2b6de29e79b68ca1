"""Which priority level a source hands out next: weighted turns among the levels that
have a record in hand (docs/scheduling.md, "Priorities").

Used by the sources whose levels are topics (Kafka, memory). `PriorityLevels` maps each
topic a worker reads to its level (a retry tier topic counts as `normal`: the levels share
their tiers) and picks the next level by stride scheduling: each level has a pass that
grows by `1 / weight` at each of its turns, and the ready level with the lowest pass goes
next (ties to the higher level). While every level has records, level `i` gets
`weights[i] / sum(weights)` of the turns, within one turn, spread evenly (6/3/1 gives
`h n l h h n h h n h`, never six highs in a row). A level with nothing in hand is
skipped, so it costs nothing while idle; when it comes back its pass is set to the
current one (the pass of the last turn), so it saved no credit and owes no debt, and it
goes at its first turn: a high job behind a low backlog is next. No ready level waits for
ever: every turn moves the current pass on to the lowest one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from consumer.core import Settings
from producer import PRIORITIES, destination_level

__all__ = ["NORMAL", "PriorityLevels", "normal_topics"]

NORMAL = PRIORITIES.index("normal")
"""The level index of `normal` (of tier topics, and of every topic without priorities)."""


def normal_topics(topics: Iterable[str]) -> list[str]:
    """The normal level's topic of each of `topics`, once, in order: the priority levels of
    a topic share its retry tiers and its dead-letter topic."""
    return list(dict.fromkeys(destination_level(topic)[0] for topic in topics))


class PriorityLevels:
    """The level of each topic a worker reads, and the weighted turns among levels."""

    __slots__ = ("_idle", "_now", "_pass", "_strides", "count", "of")

    def __init__(self, settings: Settings, topics: Iterable[str]) -> None:
        """`topics`: every topic the source reads (level topics and tiers). Without
        `routing.priorities` there is one level: `count` is 1 and every topic is level 0."""
        if settings.routing.priorities:
            weights = [settings.worker.priority_weights[level] for level in PRIORITIES]
            self.of = {topic: PRIORITIES.index(destination_level(topic)[1]) for topic in topics}
        else:
            weights = [1]
            self.of = dict.fromkeys(topics, 0)
        self.count = len(weights)
        """How many levels (1 without `routing.priorities`, else 3, highest first)."""
        scale = math.lcm(*weights)  # integer strides: exact shares, no float drift
        self._strides = [scale // weight for weight in weights]
        self._pass = [0] * self.count
        self._idle = [True] * self.count
        self._now = 0

    def pick(self, ready: Sequence[bool]) -> int | None:
        """The level to take the next record from, among those `ready` (one flag per
        level); None when none is."""
        passes, idle = self._pass, self._idle
        best = -1
        for level, has in enumerate(ready):
            if not has:
                idle[level] = True
                continue
            if idle[level]:  # back from idle: from the current pass, no credit, no debt
                idle[level] = False
                passes[level] = self._now
            if best < 0 or passes[level] < passes[best]:
                best = level
        if best < 0:
            return None
        self._now = passes[best]
        passes[best] += self._strides[best]
        return best
