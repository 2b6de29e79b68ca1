"""The Redis status store: one JSON value per job, transitions under WATCH, the index of
jobs by their last change and the workers' reports (what each is: `_status.py`).

The transitions recorded in one turn of the event loop go as one transaction, and the
cancellation checks of one turn as one MGET (`_batching.MicroBatch`): a worker starts the
jobs of a fetch together. A WATCH/GET/MULTI/EXEC round trip per transition cost a worker
about 900 µs of CPU per job; batched, under 200 (docs/benchmarks.md)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

import redis.asyncio as redis

from consumer.stores._batching import MicroBatch
from consumer.stores._keys import (
    KeyBinding,
    KeyReservation,
    KeyState,
    reserve_binding,
    settle_binding,
)
from consumer.stores._status import (
    RECENT_MAX,
    JobState,
    JobStatus,
    WatchConflict,
    _merge,
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

__all__ = ["STORE_OUTAGES", "RedisStatusStore"]

T = TypeVar("T")

_WATCH_ATTEMPTS = 100
"""Most times one status or key update is computed again after losing a WATCH race."""
STORE_OUTAGES: tuple[type[Exception], ...] = (redis.RedisError, ConnectionError, TimeoutError)
"""What a status store raises when it cannot be reached or does not answer in time."""
WRITE_TIMEOUT_S = 2.0
"""The most a batch of status writes may take: status is an observation, and a job never
waits longer for it (the status step relies on this bound)."""


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
        """The transitions of one turn as one transaction: WATCH their keys, read them with
        one MGET, merge each in order, write them all and the index in one MULTI/EXEC. A
        batch that lost a race is computed again, as `_transact` does."""
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
                    self._index(pipe, [s.job_id for s in changed.values()])
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

    def _index(self, pipe: Any, job_ids: list[str]) -> None:
        """The index: ids by their last change, bounded by the retention and INDEX_MAX,
        written in the same MULTI as the statuses (no extra round trip). It is a guide,
        not the truth: a listed id whose status expired is skipped."""
        if not job_ids:
            return
        now = time.time()
        ids = self._key("index", "jobs")
        pipe.zadd(ids, dict.fromkeys(job_ids, now))
        pipe.zremrangebyscore(ids, "-inf", now - self._ttl_ms / 1000)
        pipe.zremrangebyrank(ids, 0, -INDEX_MAX - 1)
        pipe.pexpire(ids, self._ttl_ms)

    async def _statuses(self, ids: Sequence[str]) -> list[JobStatus | None]:
        if not ids:
            return []
        raws = await self._client.mget([self._key("status", job_id) for job_id in ids])
        return [JobStatus.model_validate_json(raw) if raw else None for raw in raws]

    async def list_jobs(self, query: JobQuery) -> JobPage:
        index = self._key("index", "jobs")

        async def read(start: int, count: int) -> list[JobStatus | None]:
            ids = await self._client.zrevrange(index, start, start + count - 1)
            return await self._statuses(ids)

        return await scan(read, query)

    async def recent(self, since: datetime) -> list[JobStatus]:
        ids = await self._client.zrevrangebyscore(
            self._key("index", "jobs"), "+inf", since.timestamp(), start=0, num=RECENT_MAX
        )
        return [status for status in await self._statuses(ids) if status is not None]

    async def report_worker(self, report: WorkerReport) -> None:
        now = time.time()
        names = self._key("index", "workers")
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(
                self._key("worker", report.worker),
                report.model_dump_json(),
                px=int(WORKER_REPORT_TTL_S * 1000),
            )
            pipe.zadd(names, {report.worker: now})
            pipe.zremrangebyscore(names, "-inf", now - WORKER_REPORT_TTL_S)
            await pipe.execute()

    async def workers(self) -> list[WorkerReport]:
        names = await self._client.zrangebyscore(
            self._key("index", "workers"),
            time.time() - WORKER_REPORT_TTL_S,
            "+inf",
            start=0,
            num=WORKERS_MAX,
        )
        if not names:
            return []
        raws = await self._client.mget([self._key("worker", name) for name in names])
        reports = [WorkerReport.model_validate_json(raw) for raw in raws if raw]
        return sorted(reports, key=lambda report: report.worker)

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
