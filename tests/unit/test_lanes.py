"""LaneScheduler and lane_for: per-lane FIFO, one running item per lane (SPEC G3)."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from consumer.core import OrderingMode
from consumer.runtime import LaneScheduler, lane_for


@pytest.mark.parametrize(
    ("mode", "key", "expected"),
    [
        ("partition", b"user-1", ("jobs", 3)),
        ("partition", None, ("jobs", 3)),
        ("key", b"user-1", b"user-1"),
        ("key", None, None),
        ("none", b"user-1", None),
    ],
)
def test_lane_for(mode: OrderingMode, key: bytes | None, expected: Hashable | None) -> None:
    assert lane_for(mode, ("jobs", 3), key) == expected


def test_lane_for_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown ordering mode"):
        lane_for("strict", 0, None)  # type: ignore[arg-type]


def test_same_lane_runs_one_at_a_time_in_submission_order() -> None:
    lanes: LaneScheduler[str] = LaneScheduler()
    assert lanes.submit("k", "a1") is True
    assert lanes.submit("k", "a2") is False
    assert lanes.submit("k", "a3") is False
    assert lanes.submit("other", "b1") is True  # other lanes run in parallel
    assert (lanes.queued(), lanes.running_lanes()) == (2, 2)

    assert lanes.done("k", "a1") == "a2"
    assert lanes.done("k", "a2") == "a3"
    assert lanes.done("k", "a3") is None
    assert lanes.done("other", "b1") is None
    assert (lanes.queued(), lanes.running_lanes()) == (0, 0)


def test_items_without_a_lane_start_at_once_and_leave_no_state() -> None:
    lanes: LaneScheduler[str] = LaneScheduler()
    assert all(lanes.submit(None, item) for item in ("x", "y", "z"))
    assert (lanes.queued(), lanes.running_lanes()) == (0, 0)
    assert lanes.done(None, "x") is None


def test_done_rejects_an_item_that_is_not_running() -> None:
    lanes: LaneScheduler[str] = LaneScheduler()
    lanes.submit("k", "a1")
    lanes.submit("k", "a2")
    with pytest.raises(ValueError, match="not the running item"):
        lanes.done("k", "a2")  # queued, not running
    with pytest.raises(ValueError, match="not the running item"):
        lanes.done("idle", "a1")
    assert lanes.done("k", "a1") == "a2"  # the failed calls changed nothing


def test_done_compares_items_by_identity() -> None:
    lanes: LaneScheduler[list[int]] = LaneScheduler()
    running = [1]
    lanes.submit("k", running)
    with pytest.raises(ValueError, match="not the running item"):
        lanes.done("k", [1])  # equal, but another record
    assert lanes.done("k", running) is None


def test_drop_removes_waiting_items_in_submission_order_and_keeps_running_ones() -> None:
    lanes: LaneScheduler[tuple[int, str]] = LaneScheduler()
    # (partition, name); partition 0 is revoked.
    for lane, item in [
        ("a", (0, "a1")),
        ("a", (0, "a2")),
        ("b", (1, "b1")),
        ("b", (0, "b2")),
        ("a", (1, "a3")),
        ("b", (0, "b3")),
        ("a", (0, "a4")),
    ]:
        lanes.submit(lane, item)

    dropped = lanes.drop(lambda item: item[0] == 0)

    assert dropped == [(0, "a2"), (0, "b2"), (0, "b3"), (0, "a4")]
    assert lanes.queued() == 1
    assert lanes.done("a", (0, "a1")) == (1, "a3")  # a1 kept running; a3 moves up
    assert lanes.done("b", (1, "b1")) is None
    assert lanes.drop(lambda _: True) == []
    assert lanes.done("a", (1, "a3")) is None
    assert (lanes.queued(), lanes.running_lanes()) == (0, 0)


LANES: list[str | None] = ["k1", "k2", "k3", None]


class LaneSchedulerMachine(RuleBasedStateMachine):
    """Random submissions, completions of running items and drops, against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: LaneScheduler[int] = LaneScheduler()
        self.next_item = 0
        self.submitted: dict[str | None, list[int]] = {}  # per lane, in submission order
        self.started: dict[str | None, list[int]] = {}  # per lane, in start order
        self.running: dict[int, str | None] = {}  # item -> lane
        self.waiting = 0
        self.dropped: set[int] = set()

    def _start(self, lane: str | None, item: int) -> None:
        if lane is not None:
            assert lane not in self.running.values(), "two items of one lane running"
        self.running[item] = lane
        self.started.setdefault(lane, []).append(item)

    @rule(lane=st.sampled_from(LANES))
    def submit(self, lane: str | None) -> None:
        item = self.next_item
        self.next_item += 1
        self.submitted.setdefault(lane, []).append(item)
        if self.lanes.submit(lane, item):
            self._start(lane, item)
        else:
            assert lane is not None
            assert lane in self.running.values()
            self.waiting += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(sorted(self.running)))
        lane = self.running.pop(item)
        following = self.lanes.done(lane, item)
        if following is not None:
            self.waiting -= 1
            self._start(lane, following)

    @rule(modulus=st.integers(2, 5), remainder=st.integers(0, 4))
    def drop(self, modulus: int, remainder: int) -> None:
        dropped = self.lanes.drop(lambda item: item % modulus == remainder)
        assert dropped == sorted(dropped)
        assert all(item % modulus == remainder for item in dropped)
        assert not set(dropped) & set(self.running)
        self.dropped.update(dropped)
        self.waiting -= len(dropped)

    @invariant()
    def lanes_start_in_submission_order(self) -> None:
        for lane, started in self.started.items():
            expected = [item for item in self.submitted[lane] if item not in self.dropped]
            assert started == expected[: len(started)]
        assert self.lanes.queued() == self.waiting
        assert self.lanes.running_lanes() == sum(lane is not None for lane in self.running.values())

    def teardown(self) -> None:
        # Completing running items until none is left starts every item not dropped.
        while self.running:
            self.complete_one()
        for lane, submitted in self.submitted.items():
            assert self.started.get(lane, []) == [i for i in submitted if i not in self.dropped]
        assert (self.lanes.queued(), self.lanes.running_lanes()) == (0, 0)
        assert self.lanes._lanes == {}  # idle lanes keep no memory

    def complete_one(self) -> None:
        item, lane = next(iter(self.running.items()))
        del self.running[item]
        following = self.lanes.done(lane, item)
        if following is not None:
            self._start(lane, following)


LaneSchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestLaneScheduler = LaneSchedulerMachine.TestCase
