"""Consumer groups of a `MemoryBroker`: membership, assignment and partition ownership, as
Kafka's group coordinator keeps them (eager rebalance protocol, round-robin assignor).

A member joins with the topics it reads. Every join, leave, creation of a subscribed topic
or forced rebalance starts a new generation. A member learns of it on its next poll,
revokes every partition it owns (its runtime drains them, then it commits), releases them,
and takes each partition the new generation assigns it as soon as the previous owner
released it. So a partition never has two owners, and its new owner starts from the
group's committed offset.

The assignment is round-robin, as aiokafka's default assignor: the partitions of the
subscribed topics, sorted by (topic, partition), are dealt to the members in join order,
skipping members that do not read a partition's topic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["ConsumerGroups", "TopicPartition"]


class TopicPartition(NamedTuple):
    """One partition of a topic (the `Delivery.partition` of the memory backend)."""

    topic: str
    partition: int

    def __str__(self) -> str:
        # `Delivery.describe` formats `topic[partition]@offset`.
        return str(self.partition)


@dataclass(slots=True)
class _Group:
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    """Member id -> the topics it reads, in join order."""
    generation: int = 0
    synced: dict[str, int] = field(default_factory=dict)
    """Member id -> the generation whose assignment it took."""
    owners: dict[TopicPartition, str] = field(default_factory=dict)
    no_commit: set[str] = field(default_factory=set)
    """Members that revoke without committing in this generation (`redeliver`)."""
    plan: dict[str, frozenset[TopicPartition]] | None = None
    """The assignment of this generation, computed on first use."""


class ConsumerGroups:
    """The group coordinator of one broker; reached as `broker.groups`."""

    def __init__(self, partitions: Callable[[str], int], notify: Callable[[], None]) -> None:
        """`partitions(topic)`: the topic's partition count (0 if it does not exist);
        `notify()`: wakes everyone waiting on the broker."""
        self._partitions = partitions
        self._notify = notify
        self._groups: dict[str, _Group] = {}
        self._ids = itertools.count(1)

    def join(self, group: str, topics: Iterable[str]) -> str:
        """Add a member reading `topics`; returns its id. Starts a new generation."""
        member = f"{group}-member-{next(self._ids):04d}"
        self._group(group).members[member] = frozenset(topics)
        self._next_generation(self._group(group))
        return member

    def leave(self, group: str, member: str) -> None:
        """Remove `member` and release what it owns (a clean leave, or a crash noticed by
        the coordinator). Starts a new generation."""
        state = self._group(group)
        if state.members.pop(member, None) is None:
            return
        state.synced.pop(member, None)
        state.no_commit.discard(member)
        state.owners = {tp: owner for tp, owner in state.owners.items() if owner != member}
        self._next_generation(state)

    def rebalance(self, group: str, *, commit: bool = True) -> None:
        """Start a new generation; with `commit=False` its members revoke without
        committing, so everything after the committed offsets is delivered again."""
        state = self._group(group)
        if not commit:
            state.no_commit |= state.members.keys()
        self._next_generation(state)

    def topic_created(self, topic: str) -> None:
        """A new topic: the groups reading it rebalance to assign its partitions."""
        for state in self._groups.values():
            if any(topic in topics for topics in state.members.values()):
                self._next_generation(state)

    def generation(self, group: str) -> int:
        return self._group(group).generation

    def members(self, group: str) -> list[str]:
        """Live members, in join order."""
        return list(self._group(group).members)

    def assignment(self, group: str, member: str) -> frozenset[TopicPartition]:
        """The partitions the current generation assigns `member`."""
        state = self._group(group)
        if state.plan is None:
            state.plan = self._assign(state)
        return state.plan.get(member, frozenset())

    def owner(self, group: str, tp: TopicPartition) -> str | None:
        """The member that owns `tp` now (None while it is released)."""
        return self._group(group).owners.get(tp)

    def owns(self, group: str, member: str, tp: TopicPartition) -> bool:
        return self._group(group).owners.get(tp) == member

    def acquire(self, group: str, member: str, tp: TopicPartition) -> bool:
        """Take `tp` if the current generation assigns it to `member` and nobody owns it."""
        state = self._group(group)
        if tp not in self.assignment(group, member) or state.owners.get(tp, member) != member:
            return False
        state.owners[tp] = member
        return True

    def release(self, group: str, member: str, tps: Iterable[TopicPartition]) -> None:
        """Give up `tps` (those `member` owns); waiting members may take them now."""
        state = self._group(group)
        for tp in tps:
            if state.owners.get(tp) == member:
                del state.owners[tp]
        self._notify()

    def synced(self, group: str, member: str, generation: int) -> None:
        """`member` took the assignment of `generation`."""
        self._group(group).synced[member] = generation
        self._notify()

    def commit_on_revoke(self, group: str, member: str) -> bool:
        """Whether `member` commits when it revokes for the current generation (False once
        after `rebalance(commit=False)`)."""
        state = self._group(group)
        if member in state.no_commit:
            state.no_commit.discard(member)
            return False
        return True

    def stable(self, group: str) -> bool:
        """Every member took the current assignment and owns all of it."""
        state = self._group(group)
        for member in state.members:
            if state.synced.get(member) != state.generation:
                return False
            if any(state.owners.get(tp) != member for tp in self.assignment(group, member)):
                return False
        return True

    def _group(self, group: str) -> _Group:
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group()
        return state

    def _next_generation(self, state: _Group) -> None:
        state.generation += 1
        state.plan = None
        self._notify()

    def _assign(self, state: _Group) -> dict[str, frozenset[TopicPartition]]:
        members = list(state.members)
        topics = sorted(set().union(*state.members.values())) if members else []
        plan: dict[str, set[TopicPartition]] = {member: set() for member in members}
        turn = itertools.cycle(members)
        for topic in topics:
            readers = [m for m in members if topic in state.members[m]]
            for partition in range(self._partitions(topic)):
                member = next(turn)
                while member not in readers:
                    member = next(turn)
                plan[member].add(TopicPartition(topic, partition))
        return {member: frozenset(tps) for member, tps in plan.items()}
