"""Priorities on NATS without a server: the consumers per level, how `PullRequests` splits
the room among the levels (never more than the room, a waiting pull of one for a level
without a backlog, the rest by weight), the hand-out order of `Arrivals`, and the subjects
that dead letters, schedules and the stream use.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from consumer.core import Settings
from consumer.nats import consumer_plan, dead_letter_subjects, stream_destinations
from consumer.nats._arrivals import Arrivals
from consumer.nats._held import Held, Puller
from consumer.nats._provision import planned_consumers
from consumer.nats._pulls import PullRequests
from producer.nats import stream_subjects

S = "jobs.mail"
LEVELS = [f"{S}.priority-high", S, f"{S}.priority-low"]


def settings(*, priorities: bool = True, partitions: int = 0, **worker: Any) -> Settings:
    return Settings(
        transport="nats",
        routing={"priorities": priorities},
        jetstream={"key_partitions": partitions},
        worker={"group": "g", **worker},
    )


@dataclass
class FakeClient:
    """Records the pull requests (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`)."""

    stats: dict[str, int] = field(default_factory=lambda: {"reconnects": 0})
    pulls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        self.pulls.append((subject.rsplit(".", 1)[1], json.loads(payload)))

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        pulls, self.pulls = self.pulls, []
        return pulls


def pullers_of(config: Settings, subjects: list[str]) -> list[Puller]:
    return [
        Puller(p.config.name or "", p.partitioned, p.level)
        for p in planned_consumers(config, subjects)
    ]


def by_name(pullers: list[Puller]) -> dict[str, Puller]:
    return {p.consumer: p for p in pullers}


def fill(pullers: dict[str, Puller], requests: PullRequests, name: str, count: int) -> None:
    """`count` messages arrive for `name` (then settle at once)."""
    for _ in range(count):
        requests.received(pullers[name])


# -- consumers -------------------------------------------------------------------------


def test_each_level_has_its_own_consumers_and_normal_keeps_the_old_names() -> None:
    plan = planned_consumers(settings(partitions=2), LEVELS)
    assert [(p.config.name, p.level, p.partitioned, p.config.filter_subjects) for p in plan] == [
        ("g-high", 0, False, [f"{S}.priority-high"]),
        ("g-high-p0", 0, True, [f"{S}.priority-high.0"]),
        ("g-high-p1", 0, True, [f"{S}.priority-high.1"]),
        ("g", 1, False, [S]),
        ("g-p0", 1, True, [f"{S}.0"]),
        ("g-p1", 1, True, [f"{S}.1"]),
        ("g-low", 2, False, [f"{S}.priority-low"]),
        ("g-low-p0", 2, True, [f"{S}.priority-low.0"]),
        ("g-low-p1", 2, True, [f"{S}.priority-low.1"]),
    ]
    assert [p.config.max_ack_pending for p in plan if p.partitioned] == [1] * 6


def test_without_priorities_the_plan_is_unchanged() -> None:
    plan = consumer_plan(settings(priorities=False, partitions=1), [S, "jobs.sms"])
    assert [(c.name, c.filter_subjects) for c in plan] == [
        ("g", ["jobs.mail", "jobs.sms"]),
        ("g-p0", ["jobs.mail.0", "jobs.sms.0"]),
    ]


def test_dead_letters_and_schedules_use_the_job_types_subject() -> None:
    config = settings(partitions=2)
    assert dead_letter_subjects(config, LEVELS) == [f"dlq.{S}"]
    assert dead_letter_subjects(settings(priorities=False), [S]) == [f"dlq.{S}"]
    wanted = stream_destinations(config, LEVELS)
    assert f"{S}._scheduled.>" in wanted
    assert f"{S}.priority-high._scheduled.>" not in wanted
    # JetStream refuses overlapping subjects: `x.*` already captures `x.priority-high`.
    assert sorted(stream_subjects("x", wanted)) == sorted(
        [S, f"{S}.*", f"{S}.priority-high.*", f"{S}.priority-low.*", f"{S}._scheduled.>"]
    )


# -- the split of the room -------------------------------------------------------------


async def test_every_level_without_a_backlog_keeps_one_waiting_pull_highest_first() -> None:
    client, config = FakeClient(), settings()
    pullers = pullers_of(config, LEVELS)
    requests = PullRequests(config, pullers)
    await requests.top_up(client, 64)  # type: ignore[arg-type]
    # First a look (a backlog found at start leaves no waiting pull beside it) ...
    assert [(name, pull) for name, pull in client.take()] == [
        ("g-high", {"batch": 1, "no_wait": True}),
        ("g", {"batch": 1, "no_wait": True}),
        ("g-low", {"batch": 1, "no_wait": True}),
    ]
    for puller in pullers:
        requests.ended(puller, "404", {"Description": "No Messages"})
    await requests.top_up(client, 64)  # type: ignore[arg-type]
    pulls = client.take()
    # ... then, nothing anywhere, a waiting pull of one each.
    assert [(name, pull["batch"], "no_wait" in pull) for name, pull in pulls] == [
        ("g-high", 1, False),
        ("g", 1, False),
        ("g-low", 1, False),
    ]
    await requests.top_up(client, 64)  # type: ignore[arg-type]
    assert client.take() == []  # the waiting pulls stand; nothing more is asked

    tight = PullRequests(config, pullers_of(config, LEVELS))
    await tight.top_up(client, 2)  # type: ignore[arg-type]
    assert [name for name, _ in client.take()] == ["g-high", "g"]  # never beyond the room


async def test_a_level_with_a_backlog_gets_the_room_the_waiting_pulls_leave() -> None:
    client, config = FakeClient(), settings()
    pullers = by_name(pullers_of(config, LEVELS))
    requests = PullRequests(config, list(pullers.values()))
    await requests.top_up(client, 16)  # type: ignore[arg-type]
    client.take()
    fill(pullers, requests, "g-low", 1)  # the low level's waiting pull was answered
    await requests.top_up(client, 16 - 1)  # type: ignore[arg-type]
    # high and normal keep their waiting pull of one; low gets all the rest, at once.
    assert client.take() == [("g-low", {"batch": 13, "no_wait": True})]
    # It runs dry (404 after 5 of 13): only a waiting pull of one again, a short one (an
    # idle level's waiting pull never holds room another level may want for long).
    fill(pullers, requests, "g-low", 5)
    requests.ended(pullers["g-low"], "404", {"Description": "No Messages"})
    assert not pullers["g-low"].busy
    await requests.top_up(client, 16 - 1 - 5)  # type: ignore[arg-type]
    assert client.take() == [("g-low", {"batch": 1, "expires": 500_000_000})]


async def test_idle_levels_hold_no_room_a_level_with_a_backlog_wants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A normal backlog, high and low idle, a room of 2 (a slot or two frees at a time):
    the idle levels keep no waiting pull, they are probed with a `no_wait` pull of one
    every 0.1 s; the rest of every room goes to normal, and `starved` says it wanted more."""
    clock = [1000.0]
    monkeypatch.setattr("consumer.nats._pulls.time.monotonic", lambda: clock[0])
    client, config = FakeClient(), settings()
    pullers = by_name(pullers_of(config, LEVELS))
    requests = PullRequests(config, list(pullers.values()))
    pullers["g"].busy = True
    asked: Counter[str] = Counter()
    for _ in range(1000):  # one simulated second
        await requests.top_up(client, 2)  # type: ignore[arg-type]
        assert requests.starved
        for name, pull in client.take():
            assert pull.get("no_wait") is True
            asked[name] += pull["batch"]
            if name == "g":
                fill(pullers, requests, name, pull["batch"])
            else:
                requests.ended(pullers[name], "404", {"Description": "No Messages"})
        clock[0] += 0.001
    assert asked["g"] >= 1950
    assert 9 <= asked["g-high"] <= 11 and 9 <= asked["g-low"] <= 11


async def test_saturated_levels_are_asked_in_the_ratio_of_their_weights() -> None:
    client, config = FakeClient(), settings()
    pullers = by_name(pullers_of(config, LEVELS))
    requests = PullRequests(config, list(pullers.values()))
    for name in ("g-high", "g", "g-low"):
        pullers[name].busy = True
    asked: Counter[str] = Counter()
    rng = random.Random(7)
    for _ in range(500):
        room = rng.randint(1, 4)  # a few slots free up between two fetches
        await requests.top_up(client, room)  # type: ignore[arg-type]
        for name, pull in client.take():
            assert pull == {"batch": pull["batch"], "no_wait": True}
            asked[name] += pull["batch"]
            fill(pullers, requests, name, pull["batch"])  # a backlog fills each pull
    total = sum(asked.values())
    shares = {name: asked[name] / total for name in asked}
    assert abs(shares["g-high"] - 0.6) < 0.01
    assert abs(shares["g"] - 0.3) < 0.01
    assert abs(shares["g-low"] - 0.1) < 0.01


async def test_a_room_of_one_is_not_held_by_a_waiting_pull_of_an_idle_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`max_in_flight` 1, a low backlog, nothing high or normal: low keeps running (no
    waiting pull of another level takes the only slot for its whole expiry); the idle
    levels are looked at with a `no_wait` pull of one every 0.1 s."""
    clock = [1000.0]
    monkeypatch.setattr("consumer.nats._pulls.time.monotonic", lambda: clock[0])
    client, config = FakeClient(), settings()
    pullers = by_name(pullers_of(config, LEVELS))
    requests = PullRequests(config, list(pullers.values()))
    pullers["g-low"].busy = True
    asked: Counter[str] = Counter()
    for _ in range(1000):  # one simulated second, a 1 ms job at a time
        await requests.top_up(client, 1)  # type: ignore[arg-type]
        for name, pull in client.take():
            assert pull["batch"] == 1 and pull.get("no_wait") is True
            asked[name] += 1
            if name == "g-low":
                fill(pullers, requests, name, 1)
            else:
                requests.ended(pullers[name], "404", {"Description": "No Messages"})
        clock[0] += 0.001
    assert asked["g-low"] >= 950
    assert 9 <= asked["g-high"] <= 11 and 9 <= asked["g"] <= 11


def test_the_split_is_smooth_and_carries_over_between_calls() -> None:
    config = settings(priority_weights={"high": 6, "normal": 3, "low": 1})
    requests = PullRequests(config, pullers_of(config, LEVELS))
    picks = [requests.split(1, [9, 9, 9]).index(1) for _ in range(10)]
    assert Counter(picks) == {0: 6, 1: 3, 2: 1}
    assert picks[:3] != [0, 0, 0]  # spread, not six highs in a row
    assert requests.split(10, [2, 100, 0]) == [2, 8, 0]  # none beyond what a level wants


async def test_never_more_is_asked_than_the_room() -> None:
    """Random arrivals, 404s, expiries and rooms: what is asked and not arrived never
    exceeds the room of the call."""
    rng = random.Random(11)
    config = settings(partitions=2)
    pullers = pullers_of(config, LEVELS)
    requests = PullRequests(config, pullers)
    client = FakeClient()
    for _ in range(2000):
        room = rng.randint(0, 20)
        before = sum(p.outstanding for p in pullers)
        await requests.top_up(client, room)  # type: ignore[arg-type]
        asked = sum(pull["batch"] for _, pull in client.take())
        assert asked <= max(0, room - before)
        assert sum(p.outstanding for p in pullers) <= max(room, before)
        for puller in pullers:
            if puller.requests and rng.random() < 0.5:
                requests.received(puller)
            if puller.requests and rng.random() < 0.1:
                requests.ended(puller, rng.choice(["404", "408"]), None)
            if puller.partitioned and puller.unsettled == 0 and rng.random() < 0.3:
                puller.unsettled = 1
            elif puller.unsettled and rng.random() < 0.5:
                puller.unsettled = 0


async def test_partition_consumers_of_each_level_are_asked_one_at_a_time() -> None:
    client, config = FakeClient(), settings(partitions=2)
    pullers = by_name(pullers_of(config, LEVELS))
    requests = PullRequests(config, list(pullers.values()))
    for name in ("g-high", "g", "g-low"):
        pullers[name].busy = True
    await requests.top_up(client, 100)  # type: ignore[arg-type]
    pulls = client.take()
    one_each = {name: pull["batch"] for name, pull in pulls if "-p" in name}
    assert one_each == dict.fromkeys(
        ["g-high-p0", "g-high-p1", "g-p0", "g-p1", "g-low-p0", "g-low-p1"], 1
    )
    assert sum(pull["batch"] for _, pull in pulls) == 100


# -- the hand-out order ----------------------------------------------------------------


def held(puller: Puller, seq: int) -> Held:
    return Held(msg=None, puller=puller, seq=seq, delivered=1, stored=None, deadline=0.0)  # type: ignore[arg-type]


def test_a_high_message_is_handed_out_before_the_low_ones_received_earlier() -> None:
    config = settings()
    pullers = by_name(pullers_of(config, LEVELS))
    arrivals = Arrivals(config)
    for seq in range(10):
        arrivals.append(held(pullers["g-low"], seq))
    assert [h.seq for h in arrivals.take(2)] == [0, 1]
    arrivals.append(held(pullers["g-high"], 100))
    assert [h.seq for h in arrivals.take(1)] == [100]
    assert len(arrivals) == 8


def test_levels_with_waiting_messages_are_handed_out_by_weight_in_arrival_order() -> None:
    config = settings()
    pullers = by_name(pullers_of(config, LEVELS))
    arrivals = Arrivals(config)
    for seq in range(100):
        for offset, name in enumerate(("g-high", "g", "g-low")):
            arrivals.append(held(pullers[name], 1000 * offset + seq))
    taken = arrivals.take(50)
    levels = Counter(h.seq // 1000 for h in taken)
    assert levels == {0: 30, 1: 15, 2: 5}
    for level in range(3):  # in arrival order within a level
        seqs = [h.seq for h in taken if h.seq // 1000 == level]
        assert seqs == sorted(seqs)


def test_without_priorities_arrivals_are_first_in_first_out() -> None:
    config = settings(priorities=False)
    [puller] = pullers_of(config, [S])
    arrivals = Arrivals(config)
    for seq in range(5):
        arrivals.append(held(puller, seq))
    done = held(puller, 99)
    done.done = True
    arrivals.append(done)
    assert [h.seq for h in arrivals.take(10)] == [0, 1, 2, 3, 4]
    assert not arrivals
