"""Idempotency stores: a redelivered job that already completed runs no second time.

A claim belongs to one delivery, not to a worker: the runtime claims with a fencing token
of its own for each delivery (`token`), so a second delivery of a running job, even to
the same worker, never shares the first one's claim (issue 13, K4).

Semantics every store implements (and `tests/integration/test_idempotency_stores.py`
checks against each real server):

- `claim(key, token, lease_s)`: CLAIMED if nobody holds the key (or this token does: a
  claim retried after a lost reply); COMPLETED if the job already completed; BUSY while
  another token's claim is in the store, whether or not its lease ran out: the store does
  not judge leases, the waiting delivery does (`steps/_idempotency.py`).
- `holder(key)`: the running claim as stored now, as a stamp that changes with every
  renewal (None when no claim runs); `take_over(key, holder, token, lease_s)` replaces
  exactly that stamp (compare-and-set), so a holder that renewed meanwhile keeps its claim.
- `renew` extends this token's claim and changes its stamp; False when the claim is not
  this token's any more (taken over, completed, or gone). `complete` records completion
  for `retention_s` (before the offset is committed), whoever holds the claim then: the
  job's effect happened, and a delivery that took the claim over loses its lease at its
  next renewal. `release` gives this token's claim up, so the retry can claim it.
- A running claim stays in the store for `HOLD_LEASES` leases after its last write (the
  size bound for claims nobody completes, releases or takes over), so a claim whose holder
  was cut off by a store outage is still there, and still its own, when the store is back.

The in-memory store is per process: use it for tests and single-worker setups only.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from typing import Protocol

HOLD_LEASES = 3
"""A running claim is kept this many leases after its last write: a holder cut off by a
store outage shorter than `(HOLD_LEASES - 1) * lease_s` finds its claim again afterwards."""


class ClaimState(enum.Enum):
    CLAIMED = "claimed"
    COMPLETED = "completed"
    BUSY = "busy"


class IdempotencyStore(Protocol):
    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState: ...
    async def holder(self, key: str) -> str | None: ...
    async def take_over(self, key: str, holder: str, token: str, lease_s: float) -> bool: ...
    async def renew(self, key: str, token: str, lease_s: float) -> bool: ...
    async def complete(self, key: str, token: str, retention_s: float) -> None: ...
    async def release(self, key: str, token: str) -> None: ...
    async def close(self) -> None: ...


class MemoryIdempotencyStore:
    """Claims in a dict of this process. Not shared between workers.

    Bounded (G4): at most `max_entries` keys; beyond that the oldest entries are dropped
    first, so a very old completed job redelivered after that would run again."""

    def __init__(self, max_entries: int = 100_000) -> None:
        # key -> (completed?, token, version, expires at monotonic), oldest write first
        self._entries: OrderedDict[str, tuple[bool, str, int, float]] = OrderedDict()
        self._max_entries = max_entries
        self._versions = 0

    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
        entry = self._live(key)
        if entry is not None:
            done, holder, _, _ = entry
            if done:
                return ClaimState.COMPLETED
            if holder != token:
                return ClaimState.BUSY
        self._write(key, token, lease_s)
        self._trim()
        return ClaimState.CLAIMED

    async def holder(self, key: str) -> str | None:
        entry = self._live(key)
        if entry is None or entry[0]:
            return None
        return f"{entry[1]}#{entry[2]}"

    async def take_over(self, key: str, holder: str, token: str, lease_s: float) -> bool:
        if await self.holder(key) != holder:
            return False
        self._write(key, token, lease_s)
        return True

    async def renew(self, key: str, token: str, lease_s: float) -> bool:
        entry = self._live(key)
        if entry is None or entry[0] or entry[1] != token:
            return False
        self._write(key, token, lease_s)
        return True

    async def complete(self, key: str, token: str, retention_s: float) -> None:
        self._versions += 1
        self._entries[key] = (True, token, self._versions, time.monotonic() + retention_s)
        self._entries.move_to_end(key)
        self._trim()

    async def release(self, key: str, token: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and not entry[0] and entry[1] == token:
            del self._entries[key]

    async def close(self) -> None:
        self._entries.clear()

    def _live(self, key: str) -> tuple[bool, str, int, float] | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry[3] > time.monotonic() else None

    def _write(self, key: str, token: str, lease_s: float) -> None:
        self._versions += 1
        expires = time.monotonic() + HOLD_LEASES * lease_s
        self._entries[key] = (False, token, self._versions, expires)
        self._entries.move_to_end(key)

    def _trim(self) -> None:
        # Entries are in write order, so the oldest (the likeliest expired) come first:
        # the loop stops at the first live entry, O(1) amortised per write.
        entries, now = self._entries, time.monotonic()
        while entries:
            key = next(iter(entries))
            if entries[key][3] > now and len(entries) <= self._max_entries:
                return
            del entries[key]
