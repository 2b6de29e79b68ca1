"""Ordering lanes: which fetched records may start now (SPEC G3).

A lane is the unit of ordering. Records of one lane run one at a time, in the order they
were submitted; records of different lanes, and records without a lane, run in parallel.
`lane_for` maps the configured `OrderingMode` to a record's lane:

- ``"partition"``: the partition is the lane (Kafka's own ordering promise);
- ``"key"``: the ordering key is the lane, so one partition fans out into as many lanes as
  it has keys; records without a key promise no order and get no lane;
- ``"none"``: no lanes; every record may start at once.

`LaneScheduler` guarantees, per lane: at most one item running, items start in
submission order, and an idle lane holds no memory (a key space of millions of keys only
costs memory for the keys with work in flight). It does not bound anything itself: the
caller limits how many records it submits (G4).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = ["LaneScheduler", "OrderingMode", "lane_for"]

OrderingMode = Literal["partition", "key", "none"]

T = TypeVar("T")


def lane_for(mode: OrderingMode, partition: Hashable, key: Hashable | None) -> Hashable | None:
    """The lane of a record under ``mode``, or None when the record is unordered."""
    if mode == "partition":
        return partition
    if mode == "key":
        return key
    if mode == "none":
        return None
    msg = f"unknown ordering mode {mode!r}; expected 'partition', 'key' or 'none'"
    raise ValueError(msg)


@dataclass(slots=True)
class _Lane(Generic[T]):
    running: T
    # (submission number, item): the number lets drop() return items in submission order.
    waiting: deque[tuple[int, T]] = field(default_factory=deque)


class LaneScheduler(Generic[T]):
    """Per-lane FIFO admission of opaque items.

    Items are compared by identity: `done` must receive the very object that is running.
    Items without a lane are not recorded at all; `done` for them is a no-op.
    Not thread-safe; it is meant to be owned by one event loop.
    """

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane[T]] = {}
        self._queued = 0
        self._numbers = itertools.count()

    def submit(self, lane: Hashable | None, item: T) -> bool:
        """Admit ``item``: True if it may start now, False if it waits behind its lane."""
        if lane is None:
            return True
        state = self._lanes.get(lane)
        if state is None:
            self._lanes[lane] = _Lane(item)
            return True
        state.waiting.append((next(self._numbers), item))
        self._queued += 1
        return False

    def done(self, lane: Hashable | None, item: T) -> T | None:
        """Finish the running ``item`` of ``lane``; return the lane's next item, now running.

        Returns None when the lane has nothing waiting; the lane is then forgotten.
        Raises `ValueError` if ``item`` is not the lane's running item: finishing the
        wrong item would let two items of one lane run at once.
        """
        if lane is None:
            return None
        state = self._lanes.get(lane)
        if state is None or state.running is not item:
            msg = f"item {item!r} is not the running item of lane {lane!r}"
            raise ValueError(msg)
        if not state.waiting:
            del self._lanes[lane]
            return None
        _, state.running = state.waiting.popleft()
        self._queued -= 1
        return state.running

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove the waiting items matching ``predicate``, returned in submission order.

        Running items are never dropped: the caller owns them until it calls `done`.
        Used when partitions are revoked, so their waiting records are not started.
        """
        dropped: list[tuple[int, T]] = []
        for state in self._lanes.values():
            if not state.waiting:
                continue
            kept: deque[tuple[int, T]] = deque()
            for entry in state.waiting:
                if predicate(entry[1]):
                    dropped.append(entry)
                else:
                    kept.append(entry)
            state.waiting = kept
        self._queued -= len(dropped)
        dropped.sort(key=lambda entry: entry[0])
        return [item for _, item in dropped]

    def queued(self) -> int:
        """Items waiting behind a running item of their lane."""
        return self._queued

    def running_lanes(self) -> int:
        """Lanes with an item running; each such lane also holds its waiting items."""
        return len(self._lanes)
