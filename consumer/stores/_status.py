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

Cancellation requests live in the same store (`cancel:<job id>`), so a request made before
the job arrives is seen when it does. So do the ingress's `Idempotency-Key` bindings
(`idemkey:<name>`, the state machine of `_keys.py`), expiring `retention_s` after their last
change.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

import redis.asyncio as redis
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

from consumer.stores._batching import MicroBatch
from consumer.stores._keys import (
    KeyBinding,
    KeyReservation,
    KeyState,
    reserve_binding,
    settle_binding,
)

log = logging.getLogger("jobstream.status")

T = TypeVar("T")

_WATCH_ATTEMPTS = 100
WRITE_TIMEOUT_S = 2.0
"""The most a status write may take (a batch of them, in the Redis store): status is an
observation, and a job never waits longer for it."""
"""Most times one status or key update is computed again after losing a WATCH race."""


class WatchConflict(RuntimeError):
    """A Redis key kept changing under every attempt to update it (`_WATCH_ATTEMPTS`)."""


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

    async def close(self) -> None: ...


def _merge(
    previous: JobStatus | None, job_id: str, state: JobState, fields: dict[str, Any]
) -> JobStatus:
    base = previous.model_dump() if previous is not None else {"job_id": job_id}
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


class RedisStatusStore:
    """One JSON value per job (`<ns>:status:<id>`), expiring `retention_s` after its last
    change. Transitions are read-modify-write under WATCH, so concurrent writers (two
    workers during a rebalance, the ingress) never lose a final state."""

    def __init__(self, client: redis.Redis, namespace: str, retention_s: float) -> None:
        self._client = client
        self._ns = namespace
        self._ttl_ms = max(1, int(retention_s * 1000))
        self._records: MicroBatch[tuple[str, JobState, dict[str, Any]], JobStatus] = MicroBatch(
            self._record_batch, timeout_s=WRITE_TIMEOUT_S
        )
        self._cancel_checks: MicroBatch[tuple[str, ...], set[str]] = MicroBatch(
            self._cancelled_batch
        )

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
        return await self._records((job_id, state, fields))

    async def _record_batch(
        self, records: Sequence[tuple[str, JobState, dict[str, Any]]]
    ) -> list[JobStatus | Exception]:
        """The transitions recorded in one turn of the loop, as one transaction: WATCH
        their keys, read them with one MGET, merge each in order, write them all in one
        MULTI/EXEC. A batch that lost a race is computed again, as `_transact` does."""
        keys = list(dict.fromkeys(self._key("status", job_id) for job_id, _, _ in records))
        async with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_ATTEMPTS):
                try:
                    await pipe.watch(*keys)
                    found = dict(zip(keys, await pipe.mget(keys), strict=True))
                    answers, changed = self._merged(records, found)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for key, status in changed.items():
                        pipe.set(key, status.model_dump_json(), px=self._ttl_ms)
                    await pipe.execute()
                    return answers
                except redis.WatchError:
                    continue
        msg = f"{len(keys)} job statuses kept changing under {_WATCH_ATTEMPTS} attempts"
        raise WatchConflict(msg)

    def _merged(
        self, records: Sequence[tuple[str, JobState, dict[str, Any]]], found: dict[str, Any]
    ) -> tuple[list[JobStatus | Exception], dict[str, JobStatus]]:
        """Each record merged onto what is stored (or onto the batch's earlier record of
        the same job); a stored value that cannot be read fails its records only."""
        current: dict[str, JobStatus | None] = {}
        broken: dict[str, Exception] = {}
        for key, raw in found.items():
            try:
                current[key] = JobStatus.model_validate_json(raw) if raw else None
            except ValueError as error:
                broken[key] = error
        answers: list[JobStatus | Exception] = []
        for job_id, state, fields in records:
            key = self._key("status", job_id)
            if key in broken:
                answers.append(broken[key])
                continue
            current[key] = status = _merge(current[key], job_id, state, fields)
            answers.append(status)
        return answers, {k: v for k, v in current.items() if v is not None}

    async def _transact(self, key: str, change: Callable[[str | None], tuple[str | None, T]]) -> T:
        """Read `key`, compute `change(value)` -> (new value or None to keep it, result),
        and write it back under WATCH, so concurrent writers (workers, ingress replicas)
        never lose each other's change. A write that lost a race is computed again, at
        most `_WATCH_ATTEMPTS` times: then `WatchConflict` (every loop is bounded)."""
        async with self._client.pipeline(transaction=True) as pipe:
            for _ in range(_WATCH_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    value, result = change(await pipe.get(key))
                    if value is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return result
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, value, px=self._ttl_ms)
                    await pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        msg = f"{key} kept changing under {_WATCH_ATTEMPTS} attempts to update it"
        raise WatchConflict(msg)

    async def request_cancel(self, job_id: str) -> None:
        await self._client.set(self._key("cancel", job_id), "1", px=self._ttl_ms)

    async def cancelled(self, job_ids: Iterable[str]) -> set[str]:
        ids = tuple(job_ids)
        return await self._cancel_checks(ids) if ids else set()

    async def _cancelled_batch(self, checks: Sequence[tuple[str, ...]]) -> list[set[str]]:
        """The cancellation checks of one turn (each job's, before it starts) as one MGET."""
        ids = list(dict.fromkeys(job_id for check in checks for job_id in check))
        flags = await self._client.mget([self._key("cancel", job_id) for job_id in ids])
        found = {job_id for job_id, flag in zip(ids, flags, strict=True) if flag}
        return [found.intersection(check) for check in checks]

    async def reserve_key(
        self, name: str, job_id: str, fingerprint: str, lease_s: float
    ) -> KeyReservation:
        """Apply `reserve_binding` under WATCH: two replicas reserving one key at once
        cannot both hold it."""

        def change(raw: str | None) -> tuple[str | None, KeyReservation]:
            current = KeyBinding.model_validate_json(raw) if raw else None
            reservation = reserve_binding(current, job_id, fingerprint, lease_s)
            value = reservation.binding.model_dump_json() if reservation.held else None
            return value, reservation

        return await self._transact(self._key("idemkey", name), change)

    async def settle_key(
        self, name: str, holder: str, state: KeyState, *, spooled: bool = False
    ) -> None:
        def change(raw: str | None) -> tuple[str | None, None]:
            current = KeyBinding.model_validate_json(raw) if raw else None
            settled = settle_binding(current, holder, state, spooled=spooled)
            return (settled.model_dump_json() if settled is not None else None), None

        await self._transact(self._key("idemkey", name), change)

    async def close(self) -> None:
        await self._records.close()
        await self._cancel_checks.close()
        await self._client.aclose()


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
