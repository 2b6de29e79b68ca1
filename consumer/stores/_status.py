"""Job status: what happened to job X, shared by every worker and the ingress.

States and who sets them:

```
pending ------------(a worker starts it)--> running --> succeeded
scheduled --(due, a worker starts it)--^     |-------> retrying --(next attempt)--> running
   |  (either, cancelled before start)       |-------> dead_lettered
   |                                         |-------> failed   (no retry routing configured)
   +--------------------------------------> cancelled <--(cancel while running)--+
```

`pending` (or `scheduled`, with its `not_before`, for a job due later) is written by the
ingress after its publish returned, never before (a job id the broker never took must not
look submitted); a worker may have written `running` or a final state by then, and
`_merge` keeps it: a waiting state never replaces another state. Workers do not write
`scheduled`: a delayed job waits in the broker (tiers, server schedules) below the step
chain, where no status is written, so a job published without the ingress appears at
`running`, delayed or not. Each record expires `retention_s` after its last change (the
store stays bounded). Status is an observation, written after the fact: the broker and the
dead-letter topic remain the source of truth, and a status write that fails is logged,
never allowed to fail or block the job.

Each status keeps the history of its last `HISTORY_MAX` attempts (start and end, worker,
outcome, error, traceback), and an index of job ids by their last change lets the
dashboard list jobs (`_status_query.py`: every answer bounded). Workers' reports (lag, in
flight) live here too, each expiring on its own.

Cancellation requests live in the same store (`cancel:<job id>`), so a request made before
the job arrives is seen when it does. So do the ingress's `Idempotency-Key` bindings
(`idemkey:<name>`, the state machine of `_keys.py`), expiring `retention_s` after their last
change.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

from consumer.stores._keys import (
    KeyBinding,
    KeyReservation,
    KeyState,
    reserve_binding,
    settle_binding,
)
from consumer.stores._status_query import (
    INDEX_MAX,
    WORKER_REPORT_TTL_S,
    WORKERS_MAX,
    JobPage,
    JobQuery,
    WorkerReport,
    scan,
)

log = logging.getLogger("jobstream.status")


class WatchConflict(RuntimeError):
    """A Redis key kept changing under every attempt to update it (`_status_redis.py`)."""


class JobState(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.FAILED, JobState.CANCELLED}
)
WAITING_STATES = frozenset({JobState.PENDING, JobState.SCHEDULED})
"""Published, not started: the ingress writes them, they replace no other state, and a
cancellation settles them at once."""


HISTORY_MAX = 20
"""Most attempts a status keeps in its history (the last ones)."""
RECENT_MAX = 5_000
"""Most changes `recent` reads (the live view's outcomes per minute)."""


class Attempt(BaseModel):
    """One attempt of a job, as the worker that ran it recorded it."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    started_at: datetime | None = None
    ended_at: datetime | None = None
    worker: str | None = None
    outcome: JobState | None = None
    """The state it left the job in; None while it runs (or if its worker died)."""
    error: str | None = None
    traceback: str | None = None
    """The last 4,000 bytes of the formatted traceback (`consumer.core.traceback_text`)."""


class JobStatus(BaseModel):
    """One job's state, as `GET /v1/jobs/{id}` and `jobstream jobs status` show it."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    job_type: str | None = None
    state: JobState
    attempts: int = 0
    created_at: datetime | None = None
    updated_at: datetime
    last_error: str | None = None
    reason: str | None = None
    trace_id: str | None = None
    not_before: datetime | None = None
    """When the job was due to start (a delayed job); None: at once."""
    key: str | None = None
    """The ordering key it was published with."""
    history: tuple[Attempt, ...] = ()
    """Its last `HISTORY_MAX` attempts, oldest first."""


class StatusStore(Protocol):
    async def get(self, job_id: str) -> JobStatus | None: ...
    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus: ...
    async def request_cancel(self, job_id: str) -> None: ...
    async def cancelled(self, job_ids: Iterable[str]) -> set[str]: ...
    async def reserve_key(
        self, name: str, job_id: str, fingerprint: str, lease_s: float
    ) -> KeyReservation:
        """Reserve the `Idempotency-Key` binding `name` for `lease_s` seconds, atomically
        (`_keys.reserve_binding`); `job_id` is bound if the key is new."""

    async def settle_key(
        self, name: str, holder: str, state: KeyState, *, spooled: bool = False
    ) -> None:
        """Settle the reservation `holder` of binding `name` as `published` or `failed`
        (`_keys.settle_binding`)."""

    async def list_jobs(self, query: JobQuery) -> JobPage:
        """A bounded page of jobs, newest change first (`_status_query.scan`)."""

    async def recent(self, since: datetime) -> list[JobStatus]:
        """The jobs changed since `since`, at most `RECENT_MAX` (the newest)."""

    async def report_worker(self, report: WorkerReport) -> None:
        """Store a worker's report, expiring `WORKER_REPORT_TTL_S` after now."""

    async def workers(self) -> list[WorkerReport]:
        """The reports of the workers that reported lately (at most `WORKERS_MAX`)."""

    async def close(self) -> None: ...


def _history(previous: tuple[Attempt, ...], entry: Attempt) -> tuple[Attempt, ...]:
    """`previous` with `entry`, in the order they happened; the last `HISTORY_MAX` kept. A
    start is a new row (a replay starts again at attempt 1, a redelivery repeats its
    number: both are history); an end completes the last row of its attempt number that
    has not ended (its non-None fields win), or is a row of its own."""
    rows = list(previous)
    if entry.started_at is None:
        for index in range(len(rows) - 1, -1, -1):
            row = rows[index]
            if row.attempt == entry.attempt and row.outcome is None:
                changes = {k: v for k, v in entry.model_dump().items() if v is not None}
                rows[index] = row.model_copy(update=changes)
                return tuple(rows[-HISTORY_MAX:])
    rows.append(entry)
    return tuple(rows[-HISTORY_MAX:])


def _merge(
    previous: JobStatus | None, job_id: str, state: JobState, fields: dict[str, Any]
) -> JobStatus:
    fields = dict(fields)  # a WATCH retry computes the change again from the same fields
    entry = fields.pop("history_entry", None)
    base: dict[str, Any] = previous.model_dump() if previous is not None else {"job_id": job_id}
    if isinstance(entry, Attempt):
        # An attempt's end is history even when the state keeps an earlier final state.
        base["history"] = _history(previous.history if previous else (), entry)
        if previous is not None and previous.state in FINAL_STATES and state not in FINAL_STATES:
            return JobStatus.model_validate(base)
    if previous is not None and state in WAITING_STATES:
        # `pending` and `scheduled` are written by the ingress after its publish returned;
        # a fast worker may have started (or finished) the job by then, or a cancel come
        # first: keep its state, add what it lacks.
        known = {k: v for k, v in base.items() if v is not None}
        return JobStatus.model_validate(
            {**{k: v for k, v in fields.items() if v is not None}, **known}
        )
    # A final state is not overwritten by a late, stale transition (e.g. `running` written
    # by a redelivery of a job that already succeeded): only another final state replaces it.
    if previous is not None and previous.state in FINAL_STATES and state not in FINAL_STATES:
        return previous
    merged = {**base, **{k: v for k, v in fields.items() if v is not None}}
    merged.update(state=state, updated_at=datetime.now(UTC))
    return JobStatus.model_validate(merged)


class MemoryStatusStore:
    """Per process; for tests and single-process setups."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus] = {}
        self._cancel: set[str] = set()
        self._keys: dict[str, KeyBinding] = {}
        self._workers: dict[str, tuple[float, WorkerReport]] = {}

    async def get(self, job_id: str) -> JobStatus | None:
        return self._jobs.get(job_id)

    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus:
        status = _merge(self._jobs.pop(job_id, None), job_id, state, fields)
        self._jobs[job_id] = status  # insertion order: the last change last
        while len(self._jobs) > INDEX_MAX:
            del self._jobs[next(iter(self._jobs))]
        return status

    async def list_jobs(self, query: JobQuery) -> JobPage:
        async def read(start: int, count: int) -> list[JobStatus | None]:
            newest = list(reversed(self._jobs.values()))
            return list(newest[start : start + count])

        return await scan(read, query)

    async def recent(self, since: datetime) -> list[JobStatus]:
        found: list[JobStatus] = []
        for status in reversed(self._jobs.values()):
            if status.updated_at < since or len(found) == RECENT_MAX:
                break
            found.append(status)
        return found

    async def report_worker(self, report: WorkerReport) -> None:
        now = time.monotonic()
        self._workers[report.worker] = (now + WORKER_REPORT_TTL_S, report)
        for name, (expires, _) in list(self._workers.items()):
            if expires < now:
                del self._workers[name]

    async def workers(self) -> list[WorkerReport]:
        now = time.monotonic()
        live = [report for expires, report in self._workers.values() if expires >= now]
        return sorted(live, key=lambda report: report.worker)[:WORKERS_MAX]

    async def request_cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        return set(job_ids) & self._cancel

    async def reserve_key(
        self, name: str, job_id: str, fingerprint: str, lease_s: float
    ) -> KeyReservation:
        reservation = reserve_binding(self._keys.get(name), job_id, fingerprint, lease_s)
        self._keys[name] = reservation.binding
        return reservation

    async def settle_key(
        self, name: str, holder: str, state: KeyState, *, spooled: bool = False
    ) -> None:
        settled = settle_binding(self._keys.get(name), holder, state, spooled=spooled)
        if settled is not None:
            self._keys[name] = settled

    async def close(self) -> None:
        return None


async def cancel_job(store: StatusStore, job_id: str) -> tuple[bool, JobStatus]:
    """Ask for `job_id` to be cancelled (`POST /v1/jobs/{id}/cancel`, `jobstream jobs
    cancel`). Returns (False, its status) if it already ended; else (True, its status):
    `cancelled` at once if it had not started (pending, scheduled or not seen yet; the
    worker skips it when it arrives or comes due), unchanged if it runs (the worker tells
    its handler to stop)."""
    current = await store.get(job_id)
    if current is not None and current.state in FINAL_STATES:
        return False, current
    await store.request_cancel(job_id)
    if current is None or current.state in WAITING_STATES:
        current = await store.record(job_id, JobState.CANCELLED)
    return True, current


def trace_id_now() -> str | None:
    """The current span's trace id as 32 hex digits, if a span is recording."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
