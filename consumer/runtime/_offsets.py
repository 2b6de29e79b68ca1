"""Offset tracking: the one place that decides what may be committed.

The runtime calls `OffsetTracker.track` for every fetched record and `OffsetTracker.settle`
once the record is settled: completed, skipped as a duplicate, or durably handed to a
retry/dead-letter destination (broker acknowledged). It commits only what
`OffsetTracker.committable` returns, and reports success with
`OffsetTracker.mark_committed`. Offsets are Kafka offsets or JetStream stream sequences;
partitions are any hashable id (`aiokafka.TopicPartition`, a stream name, a tuple).

Guarantee (SPEC G2, commit after settle): a commit position returned for a partition
never passes an unsettled record. It is the lowest unsettled tracked offset, or, when
every tracked record has settled, the last tracked offset + 1. Kafka's commit position is
"the next offset to read", so committing it covers exactly the settled prefix.

Invariants, per partition:

- tracked offsets strictly increase; gaps are normal (compaction, transaction markers),
  so nothing ever assumes ``offset + 1`` is the next record;
- the commit position never moves backwards, and a position is offered by
  `committable` only while it is ahead of the last one marked committed;
- memory holds the unsettled records, the settled records ahead of the lowest unsettled
  one, and one small entry per position offered but not yet marked committed. Settled
  records behind the commit position are only counted, never stored.

Every operation is amortised O(1) per record: settling pops the settled prefix once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

__all__ = ["OffsetTracker"]

P = TypeVar("P", bound=Hashable)


class _Partition:
    """The state of one partition; see the module docstring for its invariants."""

    __slots__ = (
        "advanced",
        "committed",
        "committed_advanced",
        "first",
        "last",
        "offers",
        "offsets",
        "settled",
        "unsettled",
    )

    def __init__(self, first: int) -> None:
        self.first = first
        self.last = first - 1
        # Tracked offsets from the lowest unsettled one on; the head is always unsettled.
        self.offsets: deque[int] = deque()
        # For each offset in `offsets`: has it settled? (O(1) membership, unlike the deque.)
        self.settled: dict[int, bool] = {}
        self.unsettled = 0
        # Records the commit position has moved past since tracking began. Counting
        # instead of storing them keeps memory bounded while commits lag behind.
        self.advanced = 0
        self.committed: int | None = None
        self.committed_advanced = 0
        # (position, advanced) pairs offered by `committable` and not yet marked, so that
        # a commit that finishes late still credits exactly the records it covered.
        self.offers: deque[tuple[int, int]] = deque()

    @property
    def position(self) -> int:
        return self.offsets[0] if self.offsets else self.last + 1


class OffsetTracker(Generic[P]):
    """Tracks fetched records per partition and computes safe commit positions.

    Not thread-safe; it is meant to be owned by one event loop.
    """

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}
        self._pending = 0  # `pending_commit()` of all partitions, kept as records settle

    def track(self, partition: P, offset: int) -> None:
        """Record that ``offset`` was fetched and is now unsettled.

        Raises `ValueError` if ``offset`` is negative or not above the partition's last
        tracked offset: a fetcher that goes backwards without `forget` is a bug that
        would otherwise let a commit skip records.
        """
        if offset < 0:
            msg = f"offset {offset} of partition {partition!r} is negative"
            raise ValueError(msg)
        state = self._partitions.get(partition)
        if state is None:
            state = self._partitions[partition] = _Partition(offset)
        elif offset <= state.last:
            msg = (
                f"offset {offset} of partition {partition!r} is not above the last tracked "
                f"offset {state.last}; call forget() before fetching a partition again"
            )
            raise ValueError(msg)
        state.last = offset
        state.offsets.append(offset)
        state.settled[offset] = False
        state.unsettled += 1

    def settle(self, partition: P, offset: int) -> None:
        """Record that the record at ``offset`` is settled.

        Settling twice is a no-op: a record may reach a settled state by more than one
        path (a duplicate skip racing a retry hand-off), and settling cannot be undone.
        Offsets behind the commit position are not remembered individually, so any offset
        between the first tracked one and the commit position counts as already settled.

        Raises `ValueError` for a partition that is not tracked (or was forgotten) and
        for an offset that was never tracked.
        """
        state = self._partitions.get(partition)
        if state is None:
            msg = f"partition {partition!r} is not tracked (never tracked, or forgotten)"
            raise ValueError(msg)
        done = state.settled.get(offset)
        if done is None:
            if state.first <= offset < state.position:
                return
            msg = f"offset {offset} of partition {partition!r} was never tracked"
            raise ValueError(msg)
        if done:
            return
        state.settled[offset] = True
        state.unsettled -= 1
        offsets = state.offsets
        # Only settling the head moves the position; each offset is popped exactly once.
        while offsets and state.settled[offsets[0]]:
            del state.settled[offsets.popleft()]
            state.advanced += 1
            self._pending += 1

    def committable(self) -> dict[P, int]:
        """Commit positions that advanced beyond the last ones marked committed.

        A position may be offered although no record settled since the last commit:
        when the next tracked offset lies past a gap, committing it skips only the gap.
        """
        positions: dict[P, int] = {}
        for partition, state in self._partitions.items():
            position = state.position
            if state.committed is not None and position <= state.committed:
                continue
            positions[partition] = position
            if not state.offers or state.offers[-1][0] < position:
                state.offers.append((position, state.advanced))
        return positions

    def mark_committed(self, positions: Mapping[P, int]) -> None:
        """Record that ``positions`` were committed.

        Positions at or behind the last marked one (a commit that finished after a newer
        one) and partitions no longer tracked (revoked meanwhile) are ignored. A position
        ahead of the current commit position raises `ValueError` before anything changes:
        it cannot have come from `committable`, and it means records were committed
        before they settled.
        """
        for partition, position in positions.items():
            state = self._partitions.get(partition)
            if state is not None and position > state.position:
                msg = (
                    f"position {position} of partition {partition!r} is ahead of the "
                    f"commit position {state.position}; commit only what committable() returns"
                )
                raise ValueError(msg)
        for partition, position in positions.items():
            state = self._partitions.get(partition)
            if state is None or (state.committed is not None and position <= state.committed):
                continue
            # A position that was never offered gets the credit of the last offer before
            # it: pending_commit() may then over-count, which only makes commits earlier.
            advanced = state.committed_advanced
            while state.offers and state.offers[0][0] <= position:
                _, advanced = state.offers.popleft()
            if position == state.position:
                advanced = state.advanced
            state.committed = position
            self._pending -= advanced - state.committed_advanced
            state.committed_advanced = advanced

    def unsettled(self, partition: P | None = None) -> int:
        """Tracked records not yet settled, in ``partition`` or in all partitions."""
        if partition is not None:
            state = self._partitions.get(partition)
            return 0 if state is None else state.unsettled
        return sum(state.unsettled for state in self._partitions.values())

    def held(self, partition: P) -> int:
        """Records of ``partition`` remembered from its lowest unsettled one on: what its
        memory costs. Bound it by pausing the partition (`worker.max_held_offsets`)."""
        state = self._partitions.get(partition)
        return 0 if state is None else len(state.offsets)

    def pending_commit(self, partition: P | None = None) -> int:
        """Settled records behind the commit position that no marked commit covers yet.

        This is what committing `committable` now would newly cover; use it to batch
        commits by count. Settled records waiting behind an unsettled one are not counted:
        no commit can cover them yet.
        """
        if partition is not None:
            state = self._partitions.get(partition)
            return 0 if state is None else state.advanced - state.committed_advanced
        return self._pending

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop all state of ``partitions`` (revoked); unknown partitions are ignored."""
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                self._pending -= state.advanced - state.committed_advanced

    def partitions(self) -> frozenset[P]:
        """The partitions tracked since they were last forgotten."""
        return frozenset(self._partitions)
