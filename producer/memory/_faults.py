"""Deterministic failures of a `MemoryBroker`, for tests: `broker.faults`.

Every fault is off until a test turns it on, and changes only what the real broker would
show in that situation:

- `fail_appends(n, error)`: the next `n` appends (publishes, retry and dead-letter
  hand-offs) raise `error`, by default `BrokerUnavailable`; nothing is stored.
- `limit_record_bytes(limit)`: an append of a record over `limit` bytes (key, value and
  headers) raises `RecordTooLarge` (Kafka: `message.max.bytes`).
- `disconnect()` / `reconnect()`: while disconnected, appends raise `BrokerUnavailable`,
  fetches return nothing and commits raise `CommitFailed`.
- `delay_acks(s)`: every append waits `s` seconds before it is stored and acknowledged.
- `delay_commits(s)`: every group commit waits `s` seconds before it applies.
- `rebalance(group)`: the group rebalances: every member revokes its partitions (its
  runtime drains them, it commits) and takes its new assignment.
- `redeliver(group)`: as `rebalance`, but the members do not commit on revoke, so every
  record after the group's committed offsets is delivered again, as after a crash.

Counters (`failed_appends`, `refused_commits`) let a test assert that a fault was hit;
they wake `broker.wait_until` callers, so a test can wait for them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from producer._errors import BrokerUnavailable, PublishError
from producer._errors import RecordTooLarge as _RecordTooLarge
from producer.memory._groups import ConsumerGroups
from schemas import JobstreamError

__all__ = ["CommitFailed", "MemoryFaults", "RecordTooLarge"]

_ADDRESS = "the in-memory broker"


class RecordTooLarge(_RecordTooLarge):
    """A record is larger than the broker accepts (`MemoryFaults.limit_record_bytes`).

    Kafka refuses such a record with `MessageSizeTooLargeError`, which the Kafka publisher
    reports as `producer.RecordTooLarge` too: a permanent (non-retriable) `PublishError`."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        PublishError.__init__(
            self,
            f"memory: a record of {size} bytes to {topic!r} is over the broker's limit of "
            f"{limit} bytes; keep jobs small (pass large data by reference) or raise the limit",
        )
        self.transport, self.destination, self.detail = "memory", topic, f"{size} > {limit}"
        self.topic = topic

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.topic, self.size, self.limit))


class CommitFailed(JobstreamError):
    """A consumer-group commit was refused (aiokafka's `CommitFailedError`): the connection
    is down, or the member no longer owns a partition it committed (the group rebalanced).

    Nothing was committed. The member may commit again later; what it does not commit is
    delivered again to the partition's next owner (and skipped there as a duplicate)."""

    def __init__(self, group: str, detail: str) -> None:
        self.group = group
        self.detail = detail
        super().__init__(
            f"memory: commit of group {group!r} refused ({detail}); the records after the "
            "group's last commit will be delivered again"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.group, self.detail))


class MemoryFaults:
    """The faults of one broker (see the module docstring); reached as `broker.faults`."""

    def __init__(self, groups: ConsumerGroups, notify: Callable[[], None]) -> None:
        self._groups = groups
        self._notify = notify
        self._append_failures: collections.deque[tuple[PublishError, int]] = collections.deque()
        self._record_limit: int | None = None
        self._connected = True
        self._ack_delay_s = 0.0
        self._commit_delay_s = 0.0
        self.failed_appends = 0
        """Appends refused by a fault so far (any of them)."""
        self.refused_commits = 0
        """Group commits refused by a fault so far."""

    @property
    def connected(self) -> bool:
        """False between `disconnect()` and `reconnect()`."""
        return self._connected

    def fail_appends(self, count: int = 1, error: PublishError | None = None) -> None:
        """Refuse the next `count` appends with `error` (default: `BrokerUnavailable`)."""
        failure = error or BrokerUnavailable("memory", _ADDRESS, "fault: fail_appends")
        if count > 0:
            self._append_failures.append((failure, count))

    def limit_record_bytes(self, limit: int | None) -> None:
        """Refuse records over `limit` bytes with `RecordTooLarge` (None: no limit)."""
        self._record_limit = limit

    def disconnect(self) -> None:
        """Drop the connection of every client until `reconnect()`."""
        self._connected = False
        self._notify()

    def reconnect(self) -> None:
        """Restore the connection; waiting fetches see the records at once."""
        self._connected = True
        self._notify()

    def delay_acks(self, seconds: float) -> None:
        """Make every append wait `seconds` before it is stored and acknowledged (0: off)."""
        self._ack_delay_s = seconds

    def delay_commits(self, seconds: float) -> None:
        """Make every group commit wait `seconds` before it applies (0: off)."""
        self._commit_delay_s = seconds

    def rebalance(self, group: str) -> None:
        """Make `group` rebalance now: members revoke (drain, commit), then take over."""
        self._groups.rebalance(group)

    def redeliver(self, group: str) -> None:
        """Rewind `group`'s members to the committed offsets: a rebalance without the
        commit on revoke, so every record after the last commit is delivered again."""
        self._groups.rebalance(group, commit=False)

    def reset(self) -> None:
        """Turn every fault off (the counters stay)."""
        self._append_failures.clear()
        self._record_limit = None
        self._ack_delay_s = self._commit_delay_s = 0.0
        self.reconnect()

    async def _before_append(self, topic: str, size: int) -> None:
        """Wait the ack delay, then raise what the broker would for this append."""
        if self._ack_delay_s > 0:
            await asyncio.sleep(self._ack_delay_s)
        failure: PublishError | None = None
        if not self._connected:
            failure = BrokerUnavailable("memory", _ADDRESS, "fault: connection dropped")
        elif self._append_failures:
            failure, left = self._append_failures[0]
            if left > 1:
                self._append_failures[0] = (failure, left - 1)
            else:
                self._append_failures.popleft()
        elif self._record_limit is not None and size > self._record_limit:
            failure = RecordTooLarge(topic, size, self._record_limit)
        if failure is not None:
            self.failed_appends += 1
            self._notify()
            raise failure

    async def _before_commit(self, group: str) -> None:
        """Wait the commit delay; raise `CommitFailed` while disconnected."""
        if self._commit_delay_s > 0:
            await asyncio.sleep(self._commit_delay_s)
        if not self._connected:
            self.refused_commits += 1
            self._notify()
            raise CommitFailed(group, "the connection is down: broker.faults.disconnect()")
