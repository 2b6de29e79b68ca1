"""Idempotency stores: a redelivered job that already completed runs no second time.

Semantics every store implements (and `tests/integration/test_idempotency_stores.py`
checks against each real server):

- `claim(key, owner, lease_s)`: CLAIMED if nobody holds the key (or our own claim, or an
  expired one); COMPLETED if the job already completed; BUSY while another worker's lease
  is live (during a rebalance two workers can see the same record: only one runs it).
- `renew` extends a live claim (the runtime renews at a third of the lease while a job
  runs); `complete` records completion for `retention_s` (before the offset is committed);
  `release` gives a claim up after a failure, so the retry can claim it.

The in-memory store is per process: use it for tests and single-worker setups only.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from typing import Protocol


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    COMPLETED = "completed"
    BUSY = "busy"


class IdempotencyStore(Protocol):
    async def claim(self, key: str, owner: str, lease_s: float) -> ClaimState: ...
    async def renew(self, key: str, owner: str, lease_s: float) -> bool: ...
    async def complete(self, key: str, owner: str, retention_s: float) -> None: ...
    async def release(self, key: str, owner: str) -> None: ...
    async def close(self) -> None: ...


class MemoryIdempotencyStore:
    """Claims in a dict of this process. Not shared between workers.

    Bounded (G4): at most `max_entries` keys; beyond that the oldest entries are dropped
    first, so a very old completed job redelivered after that would run again."""

    def __init__(self, max_entries: int = 100_000) -> None:
        # key -> (completed?, owner, expires at monotonic), oldest write first
        self._entries: OrderedDict[str, tuple[bool, str, float]] = OrderedDict()
        self._max_entries = max_entries

    async def claim(self, key: str, owner: str, lease_s: float) -> ClaimState:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[2] > now:
            done, holder, _ = entry
            if done:
                return ClaimState.COMPLETED
            if holder != owner:
                return ClaimState.BUSY
        self._entries[key] = (False, owner, now + lease_s)
        self._entries.move_to_end(key)
        self._trim()
        return ClaimState.CLAIMED

    async def renew(self, key: str, owner: str, lease_s: float) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry[0] or entry[1] != owner:
            return False
        self._entries[key] = (False, owner, time.monotonic() + lease_s)
        return True

    async def complete(self, key: str, owner: str, retention_s: float) -> None:
        self._entries[key] = (True, owner, time.monotonic() + retention_s)
        self._entries.move_to_end(key)
        self._trim()

    async def release(self, key: str, owner: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and not entry[0] and entry[1] == owner:
            del self._entries[key]

    async def close(self) -> None:
        self._entries.clear()

    def _trim(self) -> None:
        # Entries are in write order, so the oldest (the likeliest expired) come first:
        # the loop stops at the first live entry, O(1) amortised per write.
        now = time.monotonic()
        while self._entries:
            key, (_, _, expires) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) <= self._max_entries:
                return
            del self._entries[key]
