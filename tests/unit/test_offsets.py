"""OffsetTracker: commit after settle (SPEC G2), checked against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer.runtime import OffsetTracker

TP = tuple[str, int]


def test_commit_position_is_lowest_unsettled_offset() -> None:
    tracker: OffsetTracker[TP] = OffsetTracker()
    for offset in (10, 11, 15, 16):  # 12-14 are a compaction gap
        tracker.track(("jobs", 0), offset)

    tracker.settle(("jobs", 0), 11)
    tracker.settle(("jobs", 0), 15)
    assert tracker.committable() == {("jobs", 0): 10}  # 10 still runs: nothing passes it

    tracker.settle(("jobs", 0), 10)
    assert tracker.committable() == {("jobs", 0): 16}  # the gap is skipped, 16 runs
    assert tracker.unsettled() == 1
    assert tracker.pending_commit() == 3


def test_all_settled_commits_last_offset_plus_one() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 3)
    tracker.track("p", 7)
    tracker.settle("p", 7)
    tracker.settle("p", 3)
    assert tracker.committable() == {"p": 8}


def test_mark_committed_stops_repeats_until_position_advances() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 0)
    tracker.track("p", 1)
    tracker.settle("p", 0)
    positions = tracker.committable()
    assert positions == {"p": 1}
    tracker.mark_committed(positions)
    assert tracker.committable() == {}
    assert tracker.pending_commit() == 0

    tracker.settle("p", 1)
    assert tracker.pending_commit() == 1
    assert tracker.committable() == {"p": 2}


def test_late_commit_of_an_older_position_is_ignored() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(3):
        tracker.track("p", offset)
    tracker.settle("p", 0)
    first = tracker.committable()
    tracker.settle("p", 1)
    second = tracker.committable()
    tracker.mark_committed(second)
    tracker.mark_committed(first)  # finished after the newer commit
    assert tracker.committable() == {}
    assert tracker.pending_commit() == 0


def test_commit_that_finishes_after_more_settled_credits_only_what_it_covered() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(4):
        tracker.track("p", offset)
    tracker.settle("p", 0)
    positions = tracker.committable()  # {"p": 1} goes out to the broker...
    tracker.settle("p", 1)
    tracker.settle("p", 2)
    tracker.mark_committed(positions)  # ...and comes back
    assert tracker.pending_commit() == 2
    assert tracker.committable() == {"p": 3}


def test_settled_records_behind_an_unsettled_one_are_not_pending_commit() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(3):
        tracker.track("p", offset)
    tracker.settle("p", 1)
    tracker.settle("p", 2)
    assert tracker.pending_commit() == 0
    assert tracker.unsettled("p") == 1


def test_settle_twice_is_a_no_op() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 0)
    tracker.track("p", 1)
    tracker.settle("p", 1)
    tracker.settle("p", 1)  # still waiting behind 0
    tracker.settle("p", 0)
    tracker.settle("p", 0)  # already behind the commit position
    assert tracker.unsettled() == 0
    assert tracker.committable() == {"p": 2}


def test_unsettled_counts_per_partition_and_in_total() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("a", 0)
    tracker.track("a", 1)
    tracker.track("b", 5)
    assert tracker.unsettled("a") == 2
    assert tracker.unsettled("b") == 1
    assert tracker.unsettled("unknown") == 0
    assert tracker.unsettled() == 3
    assert tracker.partitions() == {"a", "b"}


def test_forget_drops_a_revoked_partition() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("a", 10)
    tracker.track("b", 0)
    tracker.forget(["a", "never-tracked"])
    assert tracker.partitions() == {"b"}
    assert tracker.unsettled() == 1
    assert tracker.committable() == {"b": 0}
    tracker.mark_committed({"b": 0})
    tracker.mark_committed({"a": 11})  # a commit that finished after the revocation
    tracker.track("a", 3)  # reassigned, fetching from an older committed offset
    assert tracker.committable() == {"a": 3}


@pytest.mark.parametrize("offset", [5, 4, -1])
def test_track_rejects_offsets_that_do_not_increase(offset: int) -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 5)
    with pytest.raises(ValueError, match="offset"):
        tracker.track("p", offset)
    assert tracker.unsettled() == 1


@pytest.mark.parametrize("offset", [9, 12, 13, 99])
def test_settle_rejects_untracked_offsets(offset: int) -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 10)
    tracker.track("p", 11)
    tracker.track("p", 14)  # 12 and 13 are a gap ahead of the commit position
    with pytest.raises(ValueError, match="never tracked"):
        tracker.settle("p", offset)


def test_settle_rejects_unknown_partition() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("p", 0)
    tracker.forget(["p"])
    with pytest.raises(ValueError, match="not tracked"):
        tracker.settle("p", 0)


def test_mark_committed_rejects_a_position_past_an_unsettled_record() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    tracker.track("a", 0)
    tracker.track("b", 0)
    tracker.settle("a", 0)
    with pytest.raises(ValueError, match="ahead of the commit position"):
        tracker.mark_committed({"a": 1, "b": 1})
    assert tracker.committable() == {"a": 1, "b": 0}  # nothing was marked


def test_mark_committed_of_a_position_never_offered_over_counts_pending() -> None:
    tracker: OffsetTracker[str] = OffsetTracker()
    for offset in range(4):
        tracker.track("p", offset)
    for offset in range(3):
        tracker.settle("p", offset)
    tracker.mark_committed({"p": 2})
    assert tracker.committable() == {"p": 3}
    assert tracker.pending_commit() == 3  # errs towards committing early, never late


PARTITIONS: list[TP] = [("jobs", 0), ("jobs", 1), ("retry", 0)]


class _Model:
    def __init__(self) -> None:
        self.tracked: list[int] = []
        self.settled: set[int] = set()
        self.committed: int | None = None
        self.highest_offered: int | None = None

    @property
    def position(self) -> int:
        unsettled = [offset for offset in self.tracked if offset not in self.settled]
        return min(unsettled) if unsettled else self.tracked[-1] + 1

    def pending(self) -> int:
        committed = self.committed if self.committed is not None else -1
        return sum(1 for offset in self.tracked if committed <= offset < self.position)


class OffsetTrackerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tracker: OffsetTracker[TP] = OffsetTracker()
        self.model: dict[TP, _Model] = {}
        self.in_flight: list[dict[TP, int]] = []  # commits sent, not yet marked

    def _unsettled(self) -> list[tuple[TP, int]]:
        return [
            (partition, offset)
            for partition, model in self.model.items()
            for offset in model.tracked
            if offset not in model.settled
        ]

    @rule(partition=st.sampled_from(PARTITIONS), gap=st.integers(1, 4), start=st.integers(0, 50))
    def track(self, partition: TP, gap: int, start: int) -> None:
        model = self.model.setdefault(partition, _Model())
        offset = model.tracked[-1] + gap if model.tracked else start
        self.tracker.track(partition, offset)
        model.tracked.append(offset)

    @precondition(lambda self: self._unsettled())
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        partition, offset = data.draw(st.sampled_from(self._unsettled()))
        self.tracker.settle(partition, offset)
        self.model[partition].settled.add(offset)

    @precondition(lambda self: any(model.settled for model in self.model.values()))
    @rule(data=st.data())
    def settle_again(self, data: st.DataObject) -> None:
        partition = data.draw(st.sampled_from([p for p, m in self.model.items() if m.settled]))
        offset = data.draw(st.sampled_from(sorted(self.model[partition].settled)))
        self.tracker.settle(partition, offset)

    @rule(mark_now=st.booleans())
    def committable(self, mark_now: bool) -> None:
        positions = self.tracker.committable()
        for partition, model in self.model.items():
            if partition not in positions:
                assert model.committed is not None
                assert model.position <= model.committed
                continue
            position = positions[partition]
            assert position == model.position  # lowest unsettled, or last + 1
            assert model.committed is None or position > model.committed
            assert model.highest_offered is None or position >= model.highest_offered
            model.highest_offered = position
        assert set(positions) <= set(self.model)
        if mark_now:
            self._mark(positions)
        else:
            self.in_flight.append(positions)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def finish_commit(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.in_flight) - 1))
        self._mark(self.in_flight.pop(index))

    def _mark(self, positions: dict[TP, int]) -> None:
        self.tracker.mark_committed(positions)
        for partition, position in positions.items():
            model = self.model[partition]
            if model.committed is None or position > model.committed:
                model.committed = position

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        partition = data.draw(st.sampled_from(sorted(self.model)))
        self.tracker.forget([partition])
        del self.model[partition]
        # The runtime awaits in-flight commits of a revoked partition before forgetting it.
        for positions in self.in_flight:
            positions.pop(partition, None)
        assert partition not in self.tracker.partitions()

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.tracker.partitions() == set(self.model)
        for partition, model in self.model.items():
            assert self.tracker.unsettled(partition) == len(model.tracked) - len(model.settled)
            assert self.tracker.pending_commit(partition) == model.pending()
        assert self.tracker.unsettled() == len(self._unsettled())
        # The total is kept as records settle (O(1) per settle), not summed per call.
        assert self.tracker.pending_commit() == sum(m.pending() for m in self.model.values())

    def teardown(self) -> None:
        # Settling everything lets every partition commit exactly last + 1.
        for partition, offset in self._unsettled():
            self.tracker.settle(partition, offset)
        positions = self.tracker.committable()
        for partition, model in self.model.items():
            expected = model.tracked[-1] + 1
            if model.committed != expected:
                assert positions[partition] == expected
        self.tracker.mark_committed(positions)
        assert self.tracker.committable() == {}
        assert self.tracker.pending_commit() == 0
        assert self.tracker.unsettled() == 0


OffsetTrackerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestOffsetTracker = OffsetTrackerMachine.TestCase
