"""Step: claim the job's idempotency key before it runs; record completion after.

A claim belongs to one delivery, not to a worker (issue 13, K4): each run claims with a
token of its own (the worker's name and a counter), so a second delivery of a running
job, to another worker or to the same one, never shares the first one's claim.

- A job already completed is skipped (DUPLICATE).
- A job another delivery holds waits while that holder renews its claim. A claim seen
  unchanged (same token, same version) for a whole lease is taken over by
  compare-and-set on what was seen: a holder cut off by a store outage has had a whole
  lease, once the store was back, to renew or to record its completion first.
- While the handler runs, the claim is renewed every third of the lease. A renewal
  answered "not yours" (taken over, or completed by another run), or no renewal for a
  whole lease, cuts the run off (`JobRun.cut_off`, through the worker's `cut_off`): it
  is never settled, and is delivered again.
- A transactional handler's completion is written in its own transaction
  (`steps/_transaction.py`, fenced by this delivery's token, `JobRun.claim`); the step
  then writes no second record.
- Completion is recorded before the step returns, i.e. before the offset can be
  committed. While the store cannot record it, the claim is still renewed and the job
  stays unsettled, for `record_timeout_s` at most; then `WorkerError` stops the worker
  (exit 1): never a silent drop.
- The claim lives as long as the run really does: a handler the runtime stopped waiting
  for (a thread runs on after a cut-off or its timeout) keeps it renewed until it ends;
  only then is it released.

Store outages during a claim are waited out with backoff: the job has not run yet.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from consumer.core import DueQueue, IdempotencySettings, JobRun, Next, Outcome, WorkerError
from consumer.stores import ClaimState, IdempotencyStore
from producer.retrying import Backoff, retry

log = logging.getLogger("jobstream.idempotency")
T = TypeVar("T")
_MAX_BACKOFF_S = 5.0
_OUTAGE_BACKOFF = Backoff(initial_s=0.1, max_s=_MAX_BACKOFF_S, jitter=True)
_FINAL = (Outcome.COMPLETED, Outcome.DEAD_LETTERED, Outcome.CANCELLED)

CutOff = Callable[[JobRun, str], None]
"""How the step has the runtime cut a run off (the worker's `CutOffs`): record the reason
on the run, then cancel it."""


class IdempotencyStep:
    def __init__(
        self,
        store: IdempotencyStore,
        settings: IdempotencySettings,
        owner: str,
        *,
        cut_off: CutOff | None = None,
    ) -> None:
        self._store = store
        self.lease_s = settings.lease_s
        self._retention_s = settings.retention_s
        self._record_timeout_s = settings.record_timeout_s
        self._owner = owner
        self.cut_off = cut_off
        self._tokens = itertools.count()
        # Polls and retries well within a lease: a waiting delivery sees every renewal, and
        # a holder back from an outage records its completion before a waiter takes over.
        quick_s = min(self.lease_s / 4, _MAX_BACKOFF_S)
        self._busy_backoff = Backoff(initial_s=min(0.05, quick_s), max_s=quick_s)
        self._record_backoff = Backoff(initial_s=min(0.1, quick_s), max_s=quick_s, jitter=True)
        self._keepers: set[asyncio.Task[None]] = set()
        self.renewals: DueQueue[_Lease] = DueQueue(self.lease_s / 3, _Lease.start)
        """Running claims whose renewals have not started yet (most jobs end first)."""

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        attributes = run.attributes
        delivery = run.delivery
        # A record without attributes has no job id: its position identifies it, so that a
        # redelivery after a crash is not dead-lettered twice.
        key = attributes.dedup_key if attributes else f"record:{delivery.describe}"
        token = f"{self._owner}:{next(self._tokens)}"
        sent = time.monotonic()
        state = await _persist(lambda: self._store.claim(key, token, self.lease_s))
        if state is ClaimState.BUSY:
            state, sent = await _Waiting(self, self._store, key, token).claim()
        if state is ClaimState.COMPLETED:
            return Outcome.DUPLICATE
        lease = _Lease(self, self._store, run, key, token, sent)
        run.claim = (key, token)  # the fence of a transactional completion
        try:
            outcome = await call_next(run)
        except BaseException:
            # Cut off (shutdown, revoke, a lost claim) or a runtime fault: give the claim
            # up once the handler really ended, so that the redelivery can run.
            self._let_go(lease, run)
            raise
        if outcome not in _FINAL:  # a retry: its record claims the job again
            if _runs_on(run):
                self._let_go(lease, run)
            else:
                lease.handler_ended()
                lease.stop()
                await self._release(key, token)
            return outcome
        # Completed and dead-lettered are final: a redelivery is skipped.
        lease.handler_ended()
        if run.completed_in_transaction:  # committed with the handler's transaction
            lease.stop()
            return outcome
        try:
            await self._record(key, token)
        finally:
            lease.stop()
        return outcome

    def _let_go(self, lease: _Lease, run: JobRun) -> None:
        """Release the claim in the background, once the handler really ended."""
        lease.handler_ended()
        keeper = asyncio.create_task(self._release_when_ended(lease, run))
        self._keepers.add(keeper)
        keeper.add_done_callback(self._keepers.discard)

    async def _release_when_ended(self, lease: _Lease, run: JobRun) -> None:
        running = run.handler_running
        if running is not None and _runs_on(run):
            log.warning("keeping the claim on %s while its abandoned handler still runs", lease.key)
            await running
        lease.stop()
        await self._release(lease.key, lease.token)

    async def _release(self, key: str, token: str) -> None:
        deadline = time.monotonic() + self.lease_s
        try:
            await retry(
                lambda: self._store.release(key, token),
                on=Exception,
                backoff=self._record_backoff,
                deadline=deadline,
                on_retry=_unavailable,
            )
        except Exception as error:  # noqa: BLE001 - a claim left behind is taken over later
            log.warning(
                "could not release the claim on %s (%r): another delivery takes it over "
                "after a lease",
                key,
                error,
            )

    async def _record(self, key: str, token: str) -> None:
        deadline = time.monotonic() + self._record_timeout_s
        try:
            await retry(
                lambda: self._store.complete(key, token, self._retention_s),
                on=Exception,
                backoff=self._record_backoff,
                deadline=deadline,
                last_try_at_deadline=True,
                on_retry=_unavailable,
            )
        except Exception as error:
            msg = (
                f"could not record the completion of {key!r} in the idempotency store for "
                f"{self._record_timeout_s:g}s ({error!r}): the worker stops, and the job, "
                "unsettled, is delivered again; check the store, or raise "
                "JOBSTREAM_IDEMPOTENCY__RECORD_TIMEOUT_S"
            )
            raise WorkerError(msg) from error


class _Waiting:
    """A delivery waiting for a job another delivery holds (see the module docstring)."""

    def __init__(self, step: IdempotencyStep, store: IdempotencyStore, key: str, token: str):
        self._step, self._store, self._key, self._token = step, store, key, token
        self._seen: str | None = None
        self._seen_at = 0.0
        self._sent = 0.0

    async def claim(self) -> tuple[ClaimState, float]:
        """CLAIMED or COMPLETED, and when the winning request was sent."""
        started = time.monotonic()
        log.info("job %s is held by another delivery: waiting for it", self._key)
        state = await retry(
            self._poll,
            until=lambda polled: polled is not ClaimState.BUSY,
            backoff=self._step._busy_backoff,
        )
        ran = "running it" if state is ClaimState.CLAIMED else "it completed: skipped"
        log.info(
            "job %s waited %.1fs for another delivery; %s",
            self._key,
            time.monotonic() - started,
            ran,
        )
        return state, self._sent

    async def _poll(self) -> ClaimState:
        key, token, lease_s = self._key, self._token, self._step.lease_s
        self._sent = time.monotonic()
        state = await _persist(lambda: self._store.claim(key, token, lease_s))
        if state is not ClaimState.BUSY:
            return state
        holder = await _persist(lambda: self._store.holder(key))
        now = time.monotonic()  # after the read: the holder wrote what we saw before now
        if holder is None or holder != self._seen or now - self._sent > lease_s / 2:
            # Renewed, or a new holder: wait on. Or this poll waited out a store outage,
            # in which the holder could not renew either: its whole lease starts again
            # now that the store answers, so it can renew or record its completion first.
            self._seen, self._seen_at = holder, now
            return state
        if now - self._seen_at < lease_s:
            return state
        log.warning(
            "taking over the claim on %s: %s did not renew it for a whole lease (%gs)",
            key,
            holder,
            lease_s,
        )
        self._sent = time.monotonic()
        if await _persist(lambda: self._store.take_over(key, holder, token, lease_s)):
            return ClaimState.CLAIMED
        self._seen = None  # it changed meanwhile: watch it again
        return state


class _Lease:
    """The claim of one running delivery, renewed every third of the lease. The renewals
    start from the step's `renewals` queue a third of a lease after the claim: most jobs
    end before, and queueing costs two dict operations (a task or a timer per job cost 3
    to 16 µs)."""

    def __init__(
        self,
        step: IdempotencyStep,
        store: IdempotencyStore,
        run: JobRun,
        key: str,
        token: str,
        renewed_at: float,
    ) -> None:
        self._step, self._store, self._run = step, store, run
        self.key, self.token = key, token
        self.renewed_at = renewed_at
        """When the last renewal that succeeded was sent (`time.monotonic()`)."""
        self._handler_runs = True  # while it does, a lost claim cuts the run off
        self._lost = False
        self._job = run.task or asyncio.current_task()
        self._task: asyncio.Task[None] | None = None
        self._due = step.renewals.add(self, asyncio.get_running_loop())

    def handler_ended(self) -> None:
        """From here on a lost claim is reported, not cut off: nothing runs any more in
        the job's task (an abandoned handler keeps the renewals going until it ends)."""
        self._handler_runs = False

    def stop(self) -> None:
        self._step.renewals.discard(self._due)
        if self._task is not None:
            self._task.cancel()

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        lease_s = self._step.lease_s
        every_s = lease_s / 3
        wait_s = 0.0  # the timer waited the first third
        failing = False
        while True:
            await asyncio.sleep(wait_s)
            sent = time.monotonic()
            left_s = self.renewed_at + lease_s - sent
            if left_s <= 0:
                self._lose(f"could not renew its claim for a whole lease ({lease_s:g}s)")
            try:
                # A renewal answered after the lease ended comes too late to keep the run.
                async with asyncio.timeout(min(every_s, left_s) if left_s > 0 else every_s):
                    held = await self._store.renew(self.key, self.token, lease_s)
            except Exception as error:  # noqa: BLE001 - retried until the lease ends
                if not failing:
                    log.warning("could not renew the claim on %s: %r", self.key, error)
                failing = True
                left_s = self.renewed_at + lease_s - time.monotonic()
                wait_s = min(every_s / 2, left_s) if left_s > 0 else every_s / 2
                continue
            if not held:
                self._lose("its claim was taken over by another delivery")
                return
            if failing:
                log.info("renewed the claim on %s again", self.key)
            failing = False
            self.renewed_at, wait_s = sent, every_s

    def _lose(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        if not self._handler_runs:
            log.error(
                "the claim on %s was lost (%s) after its handler ended: another delivery "
                "may run the job",
                self.key,
                reason,
            )
            return
        log.error("job %s %s: cutting the run off", self.key, reason)
        cut_off = self._step.cut_off
        if cut_off is not None:
            cut_off(self._run, "loss of its claim")
        elif self._run.cut_off is None and self._job is not None:
            self._run.cut_off = "loss of its claim"
            self._job.cancel()


def _runs_on(run: JobRun) -> bool:
    """Whether the run's handler call still runs, abandoned (a thread, a pool process)."""
    return run.handler_running is not None and not run.handler_running.done()


async def _persist(operation: Callable[[], Awaitable[T]]) -> T:
    """Run a store operation until it succeeds (backoff with jitter), logging outages: any
    store error is an outage to wait out."""
    return await retry(operation, on=Exception, backoff=_OUTAGE_BACKOFF, on_retry=_unavailable)


def _unavailable(error: Exception, wait_s: float) -> None:
    log.warning("idempotency store unavailable (%s); retrying in %.1fs", error, wait_s)
