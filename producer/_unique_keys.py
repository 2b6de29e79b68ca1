"""`UniqueKeys`: the unique-key state machine (`producer._unique`) applied to a shared store.

The one place that chooses the store (`unique.url`): `producer._unique_redis`,
`producer._unique_postgres` and `producer._unique_nats` are imported here, on first use, so
a producer without unique jobs imports none of their clients (as `producer._backends`).

Guarantees:

- Every store call ends within `unique.timeout_s`; a store that does not answer, or refuses
  the connection, raises `UniqueStoreUnavailable` (retriable) before anything is published.
- Every loop is bounded: a compare-and-set that lost a race is tried again at once (each
  loss is another publish's progress), at most `_MAX_CONFLICTS` times; a key another
  publish holds is polled with backoff (`producer.retrying`) for at most twice
  `unique.lease_s`, then `UniqueKeyBusy`.
- Settling never raises: a receipt is returned even if the store cannot record it (the key
  then stays reserved until its lease ends, and a later publish sends the same job id
  again, which the broker and the workers drop as a repeat).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

from producer._errors import PublishError, PublishTimeout, UniqueKeyBusy, UniqueStoreUnavailable
from producer._publisher import Receipt
from producer._settings import ProducerSettings, UniqueSettings
from producer._unique import (
    MemoryUniqueStore,
    UniqueRecord,
    UniqueStore,
    claim_record,
    settle_record,
)
from producer.retrying import Backoff, retry
from producer.secrets import with_password

__all__ = ["HeldClaims", "Reservation", "UniqueKeys", "open_unique_keys"]

log = logging.getLogger("jobstream.producer")

_T = TypeVar("_T")
_MAX_CONFLICTS = 50
_POLL = Backoff(initial_s=0.01, max_s=0.25, jitter=True)
_STORES = {
    "redis": "producer._unique_redis",
    "rediss": "producer._unique_redis",
    "unix": "producer._unique_redis",
    "postgresql": "producer._unique_postgres",
    "postgres": "producer._unique_postgres",
    "nats": "producer._unique_nats",
}


class Reservation(NamedTuple):
    """A key this publish holds: publish `job_id`, then settle it."""

    unique_key: str
    job_id: str
    """The key's job id: new, or kept from a publish that failed ambiguously or died."""
    holder: str
    taken_over: bool
    """True when the job id came from an earlier publish of the key (it may be stored)."""


class HeldClaims:
    """The unique keys of one `publish_many` chunk: its reservations (by position in the
    chunk's batch) and its duplicates (by position in the chunk's receipts)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.reservations: list[tuple[int, Reservation]] = []
        self.duplicates: dict[int, Receipt] = {}

    def add(self, claimed: Reservation | Receipt, batch_size: int) -> None:
        """Record what the next unique request got (its batch position is `batch_size`)."""
        if isinstance(claimed, Receipt):
            self.duplicates[batch_size + len(self.duplicates)] = claimed
        else:
            self.keys.add(claimed.unique_key)
            self.reservations.append((batch_size, claimed))

    def receipts(self, sent: list[Receipt]) -> list[Receipt]:
        """The chunk's receipts in input order: `sent` (the batch's) and the duplicates."""
        if not self.duplicates:
            return sent
        batch = iter(sent)
        count = len(sent) + len(self.duplicates)
        return [self.duplicates.get(i) or next(batch) for i in range(count)]


class _Busy(Exception):
    """Another publish holds the key: poll again."""


class UniqueKeys:
    """Claims and settles unique keys in one store (see the module docstring)."""

    def __init__(
        self,
        store: UniqueStore,
        settings: UniqueSettings,
        address: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`address` names the store in errors (no credentials); `clock`: wall-clock time."""
        self._store = store
        self._settings = settings
        self._address = address
        self._clock = clock

    @property
    def store(self) -> UniqueStore:
        return self._store

    async def reserve(self, unique_key: str, job_id: str, window_s: float) -> Reservation | Receipt:
        """Hold `unique_key` for this publish (a new record under `job_id`, or a dead or
        failed publish's record under its own id), or return the receipt of the key's job
        inside its window (marked `duplicate`). Waits while another publish holds it."""
        holder = uuid.uuid4().hex
        lease_s = self._settings.lease_s
        waited_s = 2 * lease_s

        async def attempt() -> Reservation | Receipt:
            for _ in range(_MAX_CONFLICTS):
                stored = await self._call(self._store.get(unique_key))
                current = None if stored is None else UniqueRecord.loads(stored.value)
                now = self._clock()
                claim = claim_record(current, job_id, holder, now, lease_s, window_s)
                record = claim.record
                if claim.outcome == "busy":
                    raise _Busy
                if claim.outcome == "published":
                    assert record.receipt is not None
                    return record.receipt._replace(duplicate=True)
                put = self._store.put(unique_key, record.dumps(), stored, record.ttl(now))
                if await self._call(put):
                    return Reservation(unique_key, record.job_id, holder, current is not None)
            raise _Busy

        try:
            return await retry(
                attempt, backoff=_POLL, on=_Busy, deadline=time.monotonic() + waited_s
            )
        except _Busy:
            raise UniqueKeyBusy(unique_key, waited_s) from None

    async def published(self, reservation: Reservation, receipt: Receipt) -> None:
        """Record the key's job as published (spooled counts). Never raises."""
        await self._settle(reservation, "published", receipt)

    async def failed(self, reservation: Reservation, error: BaseException) -> None:
        """After the publish raised `error`: a definite failure (nothing was stored) releases
        the key; an ambiguous one (`PublishTimeout`, or anything that is not a
        `PublishError`) ends the lease but keeps the job id for the next publish. Never
        raises."""
        definite = isinstance(error, PublishError) and not isinstance(error, PublishTimeout)
        await self._settle(reservation, "released" if definite else "lease-ended")

    async def settle_held(self, held: HeldClaims, sent: list[Receipt]) -> None:
        """`published` for each reservation of a chunk whose batch was sent."""
        for position, reservation in held.reservations:
            await self.published(reservation, sent[position])

    async def abandon_held(self, held: HeldClaims) -> None:
        """End the leases of a chunk whose batch failed, keeping each job id: a batch may be
        partly stored, so no key is released. Never raises."""
        for _, reservation in held.reservations:
            await self._settle(reservation, "lease-ended")

    async def _settle(
        self,
        reservation: Reservation,
        outcome: Literal["published", "released", "lease-ended"],
        receipt: Receipt | None = None,
    ) -> None:
        key, job_id, holder, _ = reservation
        try:
            for _ in range(_MAX_CONFLICTS):
                stored = await self._call(self._store.get(key))
                current = None if stored is None else UniqueRecord.loads(stored.value)
                now = self._clock()
                after = settle_record(current, job_id, holder, outcome, now, receipt)
                if after is None or stored is None:
                    return
                if after == "delete":
                    change = self._store.delete(key, stored)
                else:
                    change = self._store.put(key, after.dumps(), stored, after.ttl(now))
                if await self._call(change):
                    return
        except UniqueStoreUnavailable as error:
            log.warning(
                "unique key %r (job %s) could not be settled %s: %s; it stays reserved until "
                "its lease ends, then a publish sends the same job id again",
                key,
                job_id,
                outcome,
                error,
            )

    async def _call(self, operation: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                return await operation
        except TimeoutError:
            detail = f"no answer within {self._settings.timeout_s:g}s (unique.timeout_s)"
            raise UniqueStoreUnavailable(self._address, detail) from None
        except OSError as error:
            raise UniqueStoreUnavailable(self._address, str(error) or repr(error)) from error

    async def close(self) -> None:
        await self._store.close()


def open_unique_keys(
    settings: ProducerSettings, store: UniqueStore | None = None
) -> UniqueKeys | None:
    """The unique keys of `settings.unique` (None when `unique.url` is unset and no `store`
    is given); `store` replaces the one the URL names. Nothing connects yet: each store
    connects on its first call (bounded like every call)."""
    unique = settings.unique
    url = unique.url.get_secret_value() if unique.url is not None else None
    if store is not None:
        return UniqueKeys(store, unique, _redacted(url) if url else type(store).__name__)
    if url is None:
        return None
    if url == "memory":
        return UniqueKeys(MemoryUniqueStore(), unique, "memory")
    scheme = url.split("://", 1)[0] if "://" in url else "postgresql"  # else a conninfo
    module = importlib.import_module(_STORES[scheme])
    if scheme != "nats":  # NATS: the `nats` connection settings hold its credentials
        url = with_password(url, unique.password_file, "unique.password_file")
    opened = cast("UniqueStore", module.make_unique_store(settings, url))
    return UniqueKeys(opened, unique, _redacted(url))


def _redacted(url: str) -> str:
    """`url` without credentials, path or query: what an error message may show."""
    if "://" not in url:
        return "postgresql (conninfo)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"
