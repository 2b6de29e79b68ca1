"""`Leadership`: one replica of an app leads, through a lease in the idempotency store.

The lease is a running claim on one key (`cron:<app>:leader`) of the store the workers
already share (memory, Redis, PostgreSQL, NATS KV), with the claim semantics every store
implements (`consumer/stores/_idempotency.py`), so no store needs anything new:

- a replica that finds the key free claims it and leads; the leader renews it every
  third of `lease_s`, which changes its stamp;
- another replica watches the stamp and takes the lease over (compare-and-set on the
  stamp it saw) once it saw it unchanged for a whole `lease_s` of its own clock: a
  leader that renewed meanwhile keeps the lease;
- a leader that cannot renew for a whole `lease_s` (the store is away, or it was
  paused) stops leading before anyone can take over, and a renewal answered "not yours"
  (taken over) stops it at once;
- `resign` (a graceful stop) releases the key, so another replica leads at its next look,
  not a lease later.

A watching replica dates a stamp from when it read it (after its claim), the leader its
lease from just before the write, so the two leases never overlap. Two leaders at once
are therefore possible only for a replica whose clock ran slow, or that was paused
between its last check (right before the publish, `CronScheduler`) and the publish
itself; what they publish is deduplicated (tick job ids are deterministic). Leadership is
judged by each replica's monotonic clock: no clocks need to agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from consumer.stores import ClaimState, IdempotencyStore

log = logging.getLogger("jobstream.cron")

__all__ = ["Leadership"]


class Leadership:
    """This replica's view of the lease on `key`; `refresh()` every third of `lease_s`."""

    def __init__(
        self,
        store: IdempotencyStore,
        key: str,
        token: str,
        lease_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.key = key
        self.token = token
        self.lease_s = lease_s
        self._monotonic = monotonic
        self._renewed_at: float | None = None  # leading since this (last good renewal)
        self._seen: tuple[str, float] | None = None  # another holder's stamp, first seen

    @property
    def leading(self) -> bool:
        """Whether this replica leads now: its last renewal is less than a lease old."""
        renewed = self._renewed_at
        return renewed is not None and self._monotonic() - renewed < self.lease_s

    async def refresh(self) -> bool:
        """Renew the lease if this replica leads, else try to take it; returns `leading`.
        A store error is raised after the lease's own bound was applied."""
        now = self._monotonic()
        if self._renewed_at is not None and await self._keep(now):
            return True
        return await self._take(now)  # (a lapsed lease nobody took over is taken again)

    async def hold(self) -> bool:
        """Renew the lease if a third of it has passed, but never take it; returns
        `leading`. The leader calls it before each tick it publishes, so a long turn keeps
        its lease and a leader whose lease ran out (paused, the store slow) publishes
        nothing more."""
        if self._renewed_at is None:
            return False
        return await self._keep(self._monotonic())

    async def _keep(self, now: float) -> bool:
        renewed = self._renewed_at
        if renewed is None:
            return False
        if now - renewed < self.lease_s / 3:
            return True
        if now - renewed >= self.lease_s:
            self._step_down("its lease ran out before it could renew it")
            return False
        if await self._store.renew(self.key, self.token, self.lease_s):
            self._renewed_at = now
            return True
        self._step_down("another replica took the lease over")
        return False

    async def resign(self) -> None:
        """Give the lease up (a graceful stop), so another replica leads at once."""
        if self._renewed_at is not None:
            self._renewed_at = None
            await self._store.release(self.key, self.token)
            log.info("cron: %s gave up the lead", self.token)

    async def _take(self, now: float) -> bool:
        state = await self._store.claim(self.key, self.token, self.lease_s)
        if state is ClaimState.CLAIMED:
            return self._lead(now, "the lease was free")
        if state is ClaimState.COMPLETED:  # nobody completes a lease key: free it
            log.warning("cron: lease key %s was recorded complete; ignoring it", self.key)
            return False
        stamp = await self._store.holder(self.key)
        if stamp is None:  # released meanwhile: claim it at the next look
            self._seen = None
            return False
        # First seen when read, not when this look began: the leader may have written the
        # stamp during the claim above, and its lease runs from just before that write.
        if not self._lapsed(stamp, self._monotonic()):
            return False
        if await self._store.take_over(self.key, stamp, self.token, self.lease_s):
            return self._lead(now, f"the leader's lease lapsed ({stamp} for {self.lease_s:g}s)")
        self._seen = None
        return False

    def _lapsed(self, stamp: str, now: float) -> bool:
        """Whether `stamp` has been seen unchanged for a whole lease (first seen now if new)."""
        if self._seen is None or self._seen[0] != stamp:
            self._seen = (stamp, now)
            return False
        return now - self._seen[1] >= self.lease_s

    def _lead(self, now: float, why: str) -> bool:
        self._renewed_at = now
        self._seen = None
        log.info("cron: %s leads (%s)", self.token, why)
        return True

    def _step_down(self, why: str) -> None:
        self._renewed_at = None
        self._seen = None
        log.warning("cron: %s stopped leading: %s", self.token, why)
