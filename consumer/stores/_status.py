"""Job status: what happened to job X, shared by every worker and the ingress.

States and who sets them:

```
pending --(a worker starts it)--> running --> succeeded
   |                                 |------> retrying --(next attempt)--> running
   |                                 |------> dead_lettered
   |                                 |------> failed        (no retry routing configured)
   +-------(cancel before start)---> cancelled <--(cancel while running)--+
```

`pending` is written by the ingress when it publishes; jobs published elsewhere appear at
`running`. Each record expires `retention_s` after its last change (the store stays
bounded). Status is an observation, written after the fact: the broker and the
dead-letter topic remain the source of truth, and a status write that fails is logged,
never allowed to fail or block the job.

Cancellation requests live in the same store (`cancel:<job id>`), so a request made before
the job arrives is seen when it does.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import redis.asyncio as redis
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

log = logging.getLogger("jobstream.status")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD_LETTERED = "dead_lettered"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.DEAD_LETTERED, JobState.FAILED, JobState.CANCELLED}
)


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


class StatusStore(Protocol):
    async def get(self, job_id: str) -> JobStatus | None: ...
    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus: ...
    async def request_cancel(self, job_id: str) -> None: ...
    async def cancelled(self, job_ids: Iterable[str]) -> set[str]: ...
    async def remember_key(self, key: str, job_id: str) -> str: ...
    async def forget_key(self, key: str) -> None: ...
    async def close(self) -> None: ...


def _merge(
    previous: JobStatus | None, job_id: str, state: JobState, fields: dict[str, Any]
) -> JobStatus:
    base = previous.model_dump() if previous is not None else {"job_id": job_id}
    if previous is not None and state is JobState.PENDING:
        # `pending` is written by the ingress after its publish returned; a fast worker may
        # have started (or finished) the job by then: keep its state, add what it lacks.
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
        self._keys: dict[str, str] = {}

    async def get(self, job_id: str) -> JobStatus | None:
        return self._jobs.get(job_id)

    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus:
        status = _merge(self._jobs.get(job_id), job_id, state, fields)
        self._jobs[job_id] = status
        return status

    async def request_cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        return set(job_ids) & self._cancel

    async def remember_key(self, key: str, job_id: str) -> str:
        return self._keys.setdefault(key, job_id)

    async def forget_key(self, key: str) -> None:
        self._keys.pop(key, None)

    async def close(self) -> None:
        return None


class RedisStatusStore:
    """One JSON value per job (`<ns>:status:<id>`), expiring `retention_s` after its last
    change. Transitions are read-modify-write under WATCH, so concurrent writers (two
    workers during a rebalance, the ingress) never lose a final state."""

    def __init__(self, client: redis.Redis, namespace: str, retention_s: float) -> None:
        self._client = client
        self._ns = namespace
        self._ttl_ms = max(1, int(retention_s * 1000))

    @classmethod
    async def connect(cls, url: str, namespace: str, retention_s: float) -> RedisStatusStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5
        )
        await cast("Awaitable[Any]", client.ping())
        return cls(client, namespace, retention_s)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._ns}:{kind}:{name}"

    async def get(self, job_id: str) -> JobStatus | None:
        raw = await self._client.get(self._key("status", job_id))
        return JobStatus.model_validate_json(raw) if raw else None

    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus:
        key = self._key("status", job_id)
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    previous = JobStatus.model_validate_json(raw) if raw else None
                    status = _merge(previous, job_id, state, fields)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, status.model_dump_json(), px=self._ttl_ms)
                    await pipe.execute()
                    return status
                except redis.WatchError:
                    continue

    async def request_cancel(self, job_id: str) -> None:
        await self._client.set(self._key("cancel", job_id), "1", px=self._ttl_ms)

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        flags = await self._client.mget([self._key("cancel", job_id) for job_id in ids])
        return {job_id for job_id, flag in zip(ids, flags, strict=True) if flag}

    async def remember_key(self, key: str, job_id: str) -> str:
        """Bind an Idempotency-Key to `job_id` unless bound already; returns the bound id."""
        name = self._key("idemkey", key)
        if await self._client.set(name, job_id, nx=True, px=self._ttl_ms):
            return job_id
        existing = await self._client.get(name)
        return str(existing) if existing else job_id

    async def forget_key(self, key: str) -> None:
        await self._client.delete(self._key("idemkey", key))

    async def close(self) -> None:
        await self._client.aclose()


async def open_status_store(
    backend: str, url: str | None, namespace: str, retention_s: float
) -> StatusStore | None:
    if backend == "none":
        return None
    if backend == "memory":
        return MemoryStatusStore()
    return await RedisStatusStore.connect(url or "", namespace, retention_s)


def trace_id_now() -> str | None:
    """The current span's trace id as 32 hex digits, if a span is recording."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
