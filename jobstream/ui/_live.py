"""The live view's numbers, from the status store: jobs in flight and the workers'
lag (their reports, `consumer/runtime/_report.py`), and attempts' outcomes per minute (the
history of the jobs changed in the last `MINUTES` minutes, at most `RECENT_MAX` jobs)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from consumer.stores import JobState, JobStatus, PartitionBacklog, StatusStore, WorkerReport

__all__ = ["MINUTES", "OUTCOMES", "LiveView", "live_view"]

MINUTES = 10
OUTCOMES = (
    JobState.SUCCEEDED,
    JobState.RETRYING,
    JobState.DEAD_LETTERED,
    JobState.FAILED,
    JobState.CANCELLED,
)
MAX_RUNNING_SHOWN = 50


@dataclass
class LiveView:
    workers: list[WorkerReport]
    in_flight: int
    running: list[JobStatus]
    minutes: list[tuple[str, dict[JobState, int]]]
    """Oldest first: ("HH:MM", outcome -> attempts that ended with it in that minute)."""
    lag: list[tuple[str, PartitionBacklog]] = field(default_factory=list)
    """(worker, partition backlog) of main destinations."""
    tiers: dict[str, int] = field(default_factory=dict)
    """Retry tier topic -> messages waiting."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


async def live_view(status: StatusStore, now: datetime | None = None) -> LiveView:
    now = now or datetime.now(UTC)
    start = (now - timedelta(minutes=MINUTES - 1)).replace(second=0, microsecond=0)
    workers = await status.workers()
    recent = await status.recent(start)
    counts: dict[datetime, Counter[JobState]] = {}
    for job in recent:
        for attempt in job.history:
            if attempt.outcome is None or attempt.ended_at is None or attempt.ended_at < start:
                continue
            minute = attempt.ended_at.astimezone(UTC).replace(second=0, microsecond=0)
            counts.setdefault(minute, Counter())[attempt.outcome] += 1
    minutes = []
    for index in range(MINUTES):
        minute = start + timedelta(minutes=index)
        tally = counts.get(minute, Counter())
        minutes.append((minute.strftime("%H:%M"), {state: tally[state] for state in OUTCOMES}))
    view = LiveView(
        workers=workers,
        in_flight=sum(report.in_flight for report in workers),
        running=[job for job in recent if job.state is JobState.RUNNING][:MAX_RUNNING_SHOWN],
        minutes=minutes,
        now=now,
    )
    for report in workers:
        for entry in report.backlog:
            if entry.tier:
                view.tiers[entry.destination] = (
                    view.tiers.get(entry.destination, 0) + entry.messages
                )
            else:
                view.lag.append((report.worker, entry))
    view.lag.sort(key=lambda pair: (pair[1].destination, pair[1].partition))
    return view
