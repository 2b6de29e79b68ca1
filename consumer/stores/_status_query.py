"""What the dashboard asks the status store: pages of jobs, recent changes, workers' reports.

Every answer is bounded. A job list reads the store's index of jobs (newest change first,
at most `INDEX_MAX` ids, none older than the retention) in batches, keeps those that match
the query, and stops at `query.limit` matches or `SCAN_MAX` ids read, whichever comes
first; the page's `next_cursor` continues from there. So a filter that matches nothing in
a huge store costs `SCAN_MAX` reads, not a full scan, and the page says how far it looked.

Workers report what only they can see, every few seconds (`consumer/runtime/_report.py`):
their jobs in flight and, per partition (Kafka) or consumer (NATS) they hold, the messages
not yet settled, main topics and retry tiers apart. A report expires `WORKER_REPORT_TTL_S`
after it was written, so a worker that stopped drops out of the live view by itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from consumer.stores._status import JobState, JobStatus

__all__ = [
    "INDEX_MAX",
    "SCAN_MAX",
    "WORKER_REPORT_TTL_S",
    "JobPage",
    "JobQuery",
    "PartitionBacklog",
    "WorkerReport",
    "scan",
]

INDEX_MAX = 50_000
"""Most job ids the index keeps (the oldest changes drop out first)."""
SCAN_MAX = 2_000
"""Most ids one page reads before it answers with what matched so far."""
WORKERS_MAX = 200
"""Most worker reports the live view reads."""
WORKER_REPORT_TTL_S = 10.0
"""A worker's report expires this long after it was written."""
_BATCH = 200


class JobQuery(NamedTuple):
    """Which jobs a page lists: all filters optional, newest change first."""

    state: JobState | None = None
    job_type: str | None = None
    key: str | None = None
    """The ordering key, exactly."""
    limit: int = 50
    cursor: int = 0
    """Where the previous page stopped in the index (0: the newest)."""

    def matches(self, job: JobStatus) -> bool:
        return (
            (self.state is None or job.state == self.state)
            and (self.job_type is None or job.job_type == self.job_type)
            and (self.key is None or job.key == self.key)
        )


class JobPage(NamedTuple):
    jobs: list[JobStatus]
    next_cursor: int | None
    """Pass it as `JobQuery.cursor` for the next page; None: the index ends here."""
    scanned: int
    """Ids read for this page (at most `SCAN_MAX`)."""


class PartitionBacklog(BaseModel):
    """Messages in one partition (Kafka) or consumer (NATS) not yet settled by a worker."""

    model_config = ConfigDict(frozen=True)

    destination: str
    partition: str
    messages: int
    tier: bool = False
    """A retry tier's topic (its messages are retries waiting for their time)."""


class WorkerReport(BaseModel):
    """What one worker holds now, as it last reported it."""

    model_config = ConfigDict(frozen=True)

    worker: str
    group: str
    transport: str
    in_flight: int
    reported_at: datetime
    backlog: tuple[PartitionBacklog, ...] = ()


async def scan(
    read: Callable[[int, int], Awaitable[Sequence[JobStatus | None]]], query: JobQuery
) -> JobPage:
    """A page for `query`: `read(start, count)` gives the statuses at index positions
    `start..start+count` (None for an id whose status expired; fewer at the end)."""
    limit = max(1, min(query.limit, 500))
    position, scanned = max(0, query.cursor), 0
    found: list[JobStatus] = []
    while scanned < SCAN_MAX:
        batch = await read(position, min(_BATCH, SCAN_MAX - scanned))
        if not batch:
            return JobPage(found, None, scanned)
        for job in batch:
            position += 1
            scanned += 1
            if job is not None and query.matches(job):
                found.append(job)
                if len(found) == limit:
                    return JobPage(found, position, scanned)
    return JobPage(found, position, scanned)
