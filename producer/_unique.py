"""Unique jobs: a state machine per unique key, kept in a store every producer shares.

```
(none), or expired --claim--> reserved(job_id, holder, lease_until, window_until)
reserved --published(receipt)--> published(receipt)     until window_until: repeats get it
reserved --definite failure (by its holder)--> (none)  the next publish claims it anew
reserved --ambiguous failure (by its holder)--> reserved, lease ended (the SAME job_id)
reserved past its lease --claim--> reserved (the SAME job_id and window, a new holder)
```

Rules (pure functions here; `UniqueKeys` applies them with compare-and-set on the store):

- A key's job id never changes while its record lives: a publish that timed out (the job
  may be stored) or whose publisher died is published again under the same id, so the
  broker (JetStream's duplicate window) and the workers' idempotency drop a second copy.
- `published` is final until `window_until` (the first claim's time + its `unique_for`).
  Any holder may settle `published` (its record carries the key's job id); only the current
  holder releases or ends its lease, so a publish that was taken over undoes nothing.
- A record is gone once its window is over and nobody holds it (`expired`): the next
  publish starts a new job and a new window. Stores drop records by themselves too (TTL).

Times are wall-clock seconds (`time.time`), compared by each producer: keep their clocks
within a fraction of `unique.lease_s` of each other (NTP does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Literal, NamedTuple, Protocol

from producer._publisher import Receipt
from producer._request import PublishRequest

__all__ = [
    "MAX_UNIQUE_KEY_BYTES",
    "Claim",
    "MemoryUniqueStore",
    "Stored",
    "UniqueRecord",
    "UniqueStore",
    "claim_record",
    "settle_record",
    "unique_window",
]

MAX_UNIQUE_KEY_BYTES = 512
"""Longest unique key (UTF-8 bytes): a key names a store entry, so it is bounded."""


@dataclasses.dataclass(frozen=True, slots=True)
class UniqueRecord:
    """One unique key's record, as stored (JSON)."""

    job_id: str
    """The job id bound to the key, kept through failures and takeovers."""
    holder: str
    """Token of the publish that holds (or last held) the key."""
    lease_until: float
    """While reserved: when the holder counts as gone and may be taken over."""
    window_until: float
    """When the unique window ends: the first claim's time plus its `unique_for`."""
    receipt: Receipt | None = None
    """The job's receipt once published (the record is `published`), else None."""

    def expired(self, now: float) -> bool:
        """Whether the record no longer counts: its window is over and nobody holds it."""
        return self.window_until <= now and (self.receipt is not None or self.lease_until <= now)

    def ttl(self, now: float) -> float:
        """How long a store must keep the record (at least a millisecond)."""
        until = self.window_until if self.receipt is not None else self.lease_until
        return max(self.window_until, until) - now

    def dumps(self) -> str:
        fields = dataclasses.asdict(self)
        fields["receipt"] = None if self.receipt is None else list(self.receipt)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> UniqueRecord:
        fields = json.loads(text)
        receipt = fields.pop("receipt")
        return cls(**fields, receipt=None if receipt is None else Receipt(*receipt))


class Claim(NamedTuple):
    """What a publish gets against a key's current record (`claim_record`)."""

    outcome: Literal["reserved", "published", "busy"]
    """`reserved`: store `record` (compare-and-set) and publish `record.job_id`;
    `published`: `record.receipt` is the key's job; `busy`: another publish holds it."""
    record: UniqueRecord


def claim_record(
    current: UniqueRecord | None,
    job_id: str,
    holder: str,
    now: float,
    lease_s: float,
    window_s: float,
) -> Claim:
    """The claim of a publish (token `holder`, `job_id` for a new record) at `now`."""
    if current is None or current.expired(now):
        return Claim("reserved", UniqueRecord(job_id, holder, now + lease_s, now + window_s))
    if current.receipt is not None:
        return Claim("published", current)
    if current.lease_until > now:
        return Claim("busy", current)
    taken = dataclasses.replace(current, holder=holder, lease_until=now + lease_s)
    return Claim("reserved", taken)


def settle_record(
    current: UniqueRecord | None,
    job_id: str,
    holder: str,
    outcome: Literal["published", "released", "lease-ended"],
    now: float,
    receipt: Receipt | None = None,
) -> UniqueRecord | Literal["delete"] | None:
    """The record after the publish `holder` of `job_id` ended with `outcome`: a new record,
    "delete", or None for no change (gone, published already, or not this job's)."""
    if current is None or current.job_id != job_id or current.receipt is not None:
        return None
    if outcome == "published":
        return dataclasses.replace(current, receipt=receipt)
    if current.holder != holder:
        return None
    if outcome == "released":
        return "delete"
    return dataclasses.replace(current, lease_until=min(current.lease_until, now))


def unique_window(request: PublishRequest, max_for_s: float) -> tuple[str, float]:
    """(unique key, window in seconds) of a unique request; `ValueError` for a `unique_for`
    without a `unique_key` or the reverse, a key that is empty or too long, or a window that
    is not finite, not positive or over `max_for_s` (`unique.max_for_s`)."""
    key, unique_for = request.unique_key, request.unique_for
    if key is None:
        msg = "unique_for needs a unique_key: the key names what must be unique"
        raise ValueError(msg)
    if unique_for is None:
        msg = "unique_key needs unique_for: how long (seconds or a timedelta) it stays unique"
        raise ValueError(msg)
    if "\x00" in key:  # PostgreSQL text cannot hold it: refused alike on every store
        msg = "unique_key must not contain NUL (U+0000)"
        raise ValueError(msg)
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        msg = "unique_key must be valid Unicode text (it has a lone surrogate)"
        raise ValueError(msg) from None
    if not 0 < size <= MAX_UNIQUE_KEY_BYTES:
        msg = f"unique_key must be 1 to {MAX_UNIQUE_KEY_BYTES} bytes (UTF-8), got {size}"
        raise ValueError(msg)
    seconds = unique_for.total_seconds() if isinstance(unique_for, timedelta) else float(unique_for)
    if not (math.isfinite(seconds) and 0 < seconds <= max_for_s):
        msg = (
            f"unique_for must be a finite number of seconds > 0 and <= unique.max_for_s "
            f"({max_for_s:g}), got {unique_for!r}"
        )
        raise ValueError(msg)
    return key, seconds


class Stored(NamedTuple):
    """A record's text as a store holds it, and its version for compare-and-set."""

    value: str
    version: int = 0
    """The store's revision (NATS KV, memory); Redis and PostgreSQL compare `value`."""


class UniqueStore(Protocol):
    """Where unique keys live: compare-and-set on one text value per key. Implementations:
    memory (here), Redis, PostgreSQL and NATS KV (`producer._unique_<name>`). Each raises
    `ConnectionError` (with the store's reason) when it cannot be reached; `UniqueKeys`
    bounds every call by `unique.timeout_s`."""

    async def get(self, key: str) -> Stored | None:
        """The key's value (None: absent, or dropped by its TTL)."""
        ...

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        """Store `value` for `ttl_s` seconds if the key still holds `expected` (None: is
        absent); False if it changed meanwhile."""
        ...

    async def delete(self, key: str, expected: Stored) -> bool:
        """Delete the key if it still holds `expected`; False if it changed meanwhile."""
        ...

    async def close(self) -> None:
        """Disconnect. Idempotent."""
        ...


class MemoryUniqueStore:
    """A `UniqueStore` in this process's memory (`unique.url = "memory"`): for tests, the
    memory transport, and producers that share one object. `clock` is the time source of
    its TTLs (a test's fake clock)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[Stored, float]] = {}
        self._versions = 0
        self._writes = 0

    async def get(self, key: str) -> Stored | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        if await self.get(key) != expected:
            return False
        self._versions += 1
        self._entries[key] = (Stored(value, self._versions), self._clock() + max(ttl_s, 0.001))
        self._writes += 1
        if self._writes % 1000 == 0:  # expired entries go now and then (the size bound)
            now = self._clock()
            self._entries = {k: e for k, e in self._entries.items() if e[1] > now}
        return True

    async def delete(self, key: str, expected: Stored) -> bool:
        if await self.get(key) != expected:
            return False
        del self._entries[key]
        return True

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        """Keys held now (expired ones excluded)."""
        now = self._clock()
        return sum(1 for _, until in self._entries.values() if until > now)
