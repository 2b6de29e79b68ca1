"""Step: claim the job's idempotency key before it runs; record completion after.

A job already completed is skipped (DUPLICATE); a job another worker holds (a rebalance in
progress) waits until that claim completes or expires, so it never runs twice at once.
Completion is recorded before the step returns, i.e. before the offset can be committed.
Store outages are retried with backoff: the job waits, it is never settled unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from consumer.core import IdempotencySettings, JobRun, Next, Outcome
from consumer.stores import ClaimState, IdempotencyStore
from producer.retrying import Backoff, retry

log = logging.getLogger("jobstream.idempotency")
T = TypeVar("T")
_MAX_BACKOFF_S = 5.0
_OUTAGE_BACKOFF = Backoff(initial_s=0.1, max_s=_MAX_BACKOFF_S, jitter=True)


class IdempotencyStep:
    def __init__(self, store: IdempotencyStore, settings: IdempotencySettings, owner: str) -> None:
        self._store = store
        self._lease_s = settings.lease_s
        self._retention_s = settings.retention_s
        self._owner = owner
        self._busy_backoff = Backoff(initial_s=0.05, max_s=min(self._lease_s / 4, _MAX_BACKOFF_S))

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        attributes = run.attributes
        delivery = run.delivery
        # A record without attributes has no job id: its position identifies it, so that a
        # redelivery after a crash is not dead-lettered twice.
        key = attributes.dedup_key if attributes else f"record:{delivery.describe}"
        if not await self._claim(key):
            return Outcome.DUPLICATE
        # Most jobs end long before a renewal is due: start the renewal loop only for the
        # ones still running after a third of the lease (a timer is far cheaper than a task).
        renewal = _Renewal(self, key)
        timer = asyncio.get_running_loop().call_later(self._lease_s / 3, renewal.start)
        try:
            outcome = await call_next(run)
        except BaseException:
            timer.cancel()
            renewal.stop()
            # Cut off (shutdown) or a runtime fault: give the claim up so the redelivery
            # can run at once instead of waiting for the lease.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.release(key, self._owner))
            raise
        timer.cancel()
        renewal.stop()
        # Completed and dead-lettered are final: a redelivery is skipped. A retry releases
        # the claim so that the retry record can take it.
        if outcome in (Outcome.COMPLETED, Outcome.DEAD_LETTERED, Outcome.CANCELLED):
            await _persist(lambda: self._store.complete(key, self._owner, self._retention_s))
        else:
            await _persist(lambda: self._store.release(key, self._owner))
        return outcome

    async def _claim(self, key: str) -> bool:
        # BUSY: another worker runs it right now; wait for its outcome (or its lease).
        state = await retry(
            lambda: _persist(lambda: self._store.claim(key, self._owner, self._lease_s)),
            until=lambda claimed: claimed is not ClaimState.BUSY,
            backoff=self._busy_backoff,
        )
        return state is ClaimState.CLAIMED

    async def renew_forever(self, key: str) -> None:
        while True:
            try:
                if not await self._store.renew(key, self._owner, self._lease_s):
                    log.warning("lost the claim on %s: another worker may take it over", key)
                    return
            except Exception as error:  # noqa: BLE001 - renewal is retried next period
                log.warning("could not renew the claim on %s: %s", key, error)
            await asyncio.sleep(self._lease_s / 3)


class _Renewal:
    """The lease renewal of one running job, started late (see `IdempotencyStep`)."""

    def __init__(self, step: IdempotencyStep, key: str) -> None:
        self._step, self._key = step, key
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._step.renew_forever(self._key))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _persist(operation: Callable[[], Awaitable[T]]) -> T:
    """Run a store operation until it succeeds (backoff with jitter), logging outages: any
    store error is an outage to wait out."""
    return await retry(operation, on=Exception, backoff=_OUTAGE_BACKOFF, on_retry=_unavailable)


def _unavailable(error: Exception, wait_s: float) -> None:
    log.warning("idempotency store unavailable (%s); retrying in %.1fs", error, wait_s)
