"""Delayed jobs: where a record with a `not_before` in the future waits (docs/scheduling.md).

Broker-free decisions, shared by the Kafka and memory sources (NATS lets its server's
scheduler wait, `consumer.nats._schedules`):

- a job due now runs;
- a job due later than `MAX_DELAY_S` is not kept: it is dead-lettered (`DelayTooLong`);
- a job due within the first retry tier's delay (the last stretch) is held in the worker's
  memory until due, its offset unsettled (bounded by `worker.max_held_offsets`);
- any other job is handed to the **largest** tier whose delay is at most its remaining
  time. A tier record is released `tier delay` after it was appended, which is then never
  later than its due time, so release times within a tier grow in append order: a delayed
  record never waits behind the one before it (no head-of-line blocking), and at its
  release it goes on to a shorter tier, or to the last stretch, until due.

Retry records keep their routing (the first tier at least as long as the retry's delay);
they wait in their tier until due, at most the tier's delay after they were appended, then
follow the same rules as a delayed record.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from schemas import JobAttributes, JobDecodeError

MAX_DELAY_S = 7 * 86400.0
"""The longest a job may wait for its `not_before` (7 days, NATS's default stream
retention); beyond it the worker dead-letters it (`delay-too-long`)."""


class DelayTooLong(JobDecodeError):
    """The job's `not_before` is further ahead than the worker keeps a job waiting."""

    reason = "delay-too-long"

    def __init__(self, remaining_s: float, limit_s: float) -> None:
        super().__init__(
            f"not_before is {remaining_s:.0f}s ahead, more than the {limit_s:.0f}s a delayed "
            "job may wait: publish it closer to its time"
        )


Action = Literal["run", "wait", "hold", "move", "too-long"]


@dataclass(frozen=True, slots=True)
class DelayPlan:
    """What to do with a record now."""

    action: Action
    """`run`: hand it out; `wait`: leave it in its tier partition (paused at it) for
    `seconds`; `hold`: keep it in memory for `seconds`, then hand it out; `move`: append
    it unchanged to tier `tier` (0-based); `too-long`: dead-letter it."""
    seconds: float = 0.0
    tier: int = 0


RUN = DelayPlan("run")


def remaining_s(attributes: JobAttributes | None, now: datetime) -> float:
    """Seconds until the job is due (0 or less: due; no `not_before`: due)."""
    due = attributes.not_before if attributes is not None else None
    return (due - now).total_seconds() if due is not None else 0.0


def plan_delay(
    remaining: float,
    tiers_s: Sequence[float],
    *,
    released_in: float | None = None,
    limit_s: float = MAX_DELAY_S,
) -> DelayPlan:
    """The plan for a record due in `remaining` seconds. `released_in`: for a tier record,
    seconds until its tier's delay after its append has passed (None for a main-topic
    record, which is checked against `limit_s`). `tiers_s`: the tier delays (empty: no
    tiers, everything is held in memory)."""
    if remaining <= 0:
        return RUN
    if released_in is None and remaining > limit_s:
        return DelayPlan("too-long", remaining)
    if released_in is not None and released_in > 0:
        return DelayPlan("wait", min(remaining, released_in))
    if not tiers_s or remaining < tiers_s[0]:
        return DelayPlan("hold", remaining)
    tier = max(index for index, delay_s in enumerate(tiers_s) if delay_s <= remaining)
    return DelayPlan("move", remaining, tier)


class Deferrals:
    """Delayed jobs a source set aside on their first attempt (Kafka and memory: read from
    a main topic and moved to a tier or held; NATS: handed to the scheduler), for the worker
    to record as `scheduled` in the status store. Off (`add` does nothing) until the worker
    enables it, which it does only with a status store. Bounded: at most `limit` wait to be
    recorded, then the oldest are dropped (status is an observation; the job is not)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._waiting: deque[JobAttributes] = deque(maxlen=limit)
        self.enabled = False

    def add(self, attributes: JobAttributes | None) -> None:
        """Note a delayed job set aside; ignored when off, and for a retry (whose state is
        `retrying` already) or a job without `not_before`."""
        if not self.enabled or attributes is None or attributes.not_before is None:
            return
        if attributes.attempt == 1:
            self._waiting.append(attributes)

    def take(self) -> list[JobAttributes]:
        """Every job noted since the last call, oldest first."""
        taken = list(self._waiting)
        self._waiting.clear()
        return taken
