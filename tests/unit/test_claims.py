"""A claim belongs to one delivery, not to a worker (issue 13, K4), on the memory store.

- A second delivery of a running job waits, to the same worker too, while the holder
  renews; it takes a claim over only after seeing it unchanged for a whole lease.
- A run whose claim is lost (renewal answered "not yours", or impossible for a whole
  lease) is cut off and never settled.
- A completion the store refuses keeps the claim alive and the job unsettled until it is
  recorded; past `idempotency.record_timeout_s` the worker stops with `WorkerError`.
- A run the runtime cut off keeps its claim while its handler goes on.

The same store semantics against Redis, PostgreSQL and NATS KV:
`tests/integration/test_idempotency_stores.py`; a NATS server outage with the NATS KV
store: `tests/integration/test_claims_nats.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer import App, ClaimState, JobContext, MemoryIdempotencyStore, WorkerError
from consumer.core import Delivery, IdempotencySettings, JobRun, Outcome, Settings
from consumer.memory import TestApp
from consumer.steps import IdempotencyStep, _idempotency
from producer.retrying import Backoff
from schemas import Job, JobAttributes

Handler = Callable[[JobRun], Awaitable[Outcome]]


def run_for(job_id: str, offset: int = 0) -> JobRun:
    attributes = JobAttributes(id=job_id, type="t.x", source="/t", time=datetime.now(UTC))
    delivery = Delivery(partition=0, offset=offset, topic="t", attributes=attributes, body=b"{}")
    return JobRun(delivery, None, None, None)


class Effects:
    """What the handlers did: (what, monotonic time), and how many ran at once at most."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.running = 0
        self.most_at_once = 0

    def handler(self, seconds: float, gate: asyncio.Event | None = None) -> Handler:
        async def handle(_: JobRun) -> Outcome:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.events.append(("start", time.monotonic()))
            try:
                await (gate.wait() if gate is not None else asyncio.sleep(seconds))
            except asyncio.CancelledError:
                self.events.append(("cancelled", time.monotonic()))
                raise
            finally:
                self.running -= 1
            self.events.append(("done", time.monotonic()))
            return Outcome.COMPLETED

        return handle

    def what(self) -> list[str]:
        return [what for what, _ in self.events]

    def when(self, what: str) -> float:
        return next(at for name, at in self.events if name == what)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s")
        await asyncio.sleep(0.01)


# -- waiting for a running delivery --------------------------------------------------------------


async def test_a_second_delivery_to_the_same_worker_waits_and_is_skipped() -> None:
    """The revoke-and-hand-back case: the same worker reads the uncommitted record again
    while the first run goes on; the second delivery waits, then finds the job completed."""
    store, effects, gate = MemoryIdempotencyStore(), Effects(), asyncio.Event()
    step = IdempotencyStep(store, IdempotencySettings(lease_s=0.3), owner="w1")
    first = asyncio.create_task(step(run_for("job-x"), effects.handler(0, gate)))
    await wait_for(lambda: effects.what() == ["start"])
    second = asyncio.create_task(step(run_for("job-x", offset=0), effects.handler(0)))
    await asyncio.sleep(1.0)  # three leases: the first run renews, the second waits
    assert effects.what() == ["start"] and not second.done()
    gate.set()
    assert await first is Outcome.COMPLETED
    assert await asyncio.wait_for(second, 5) is Outcome.DUPLICATE
    assert effects.what() == ["start", "done"], "job-x had exactly one effect"
    assert effects.most_at_once == 1


async def test_a_claim_kept_alive_is_never_taken_over_by_another_worker() -> None:
    store, effects = MemoryIdempotencyStore(), Effects()
    settings = IdempotencySettings(lease_s=0.3)
    holder = IdempotencyStep(store, settings, owner="w1")
    waiter = IdempotencyStep(store, settings, owner="w2")
    first = asyncio.create_task(holder(run_for("job-y"), effects.handler(1.5)))  # 5 leases
    await wait_for(lambda: effects.what() == ["start"])
    assert await waiter(run_for("job-y"), effects.handler(0)) is Outcome.DUPLICATE
    assert await first is Outcome.COMPLETED
    assert effects.what() == ["start", "done"]


async def test_a_silent_claim_is_taken_over_only_after_a_whole_lease_unchanged() -> None:
    store, effects = MemoryIdempotencyStore(), Effects()
    assert await store.claim("job-z", "crashed:1", 0.3) is ClaimState.CLAIMED  # never renewed
    step = IdempotencyStep(store, IdempotencySettings(lease_s=0.3), owner="w1")
    started = time.monotonic()
    assert await step(run_for("job-z"), effects.handler(0)) is Outcome.COMPLETED
    assert 0.3 <= effects.when("start") - started < 0.3 + 1.0
    assert not await store.renew("job-z", "crashed:1", 0.3), "fenced: its token lost the claim"


async def test_a_store_outage_restarts_the_waiters_lease_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store is away for two leases while the holder records its completion and a
    second delivery waits: when it is back, the waiter counts a whole lease again before
    it may take over, so the holder records the completion first and the job runs once
    (the chaos run's PostgreSQL restart)."""
    # The waiter retries every 10 ms while the store is away, so it reads the claim again
    # as soon as the store is back.
    monkeypatch.setattr(_idempotency, "_OUTAGE_BACKOFF", Backoff(initial_s=0.01, max_s=0.01))
    store, effects, gate = MemoryIdempotencyStore(), Effects(), asyncio.Event()
    down, renew_down, complete_back_at = False, False, 0.0
    for name in ("claim", "renew", "complete", "release", "holder", "take_over"):
        method = getattr(store, name)

        def guarded(*args: Any, _method: Any = method, _name: str = name) -> Any:
            # The holder's own connection comes back a little later (a broken pooled
            # connection is replaced first), within a lease.
            late = _name == "complete" and time.monotonic() < complete_back_at
            if down or late or (renew_down and _name == "renew"):
                raise ConnectionError("store restarting")
            return _method(*args)

        setattr(store, name, guarded)
    settings = IdempotencySettings(lease_s=0.3)
    holder = IdempotencyStep(store, settings, owner="w1")
    waiter = IdempotencyStep(store, settings, owner="w2")
    first = asyncio.create_task(holder(run_for("job-o"), effects.handler(0, gate)))
    await wait_for(lambda: effects.what() == ["start"])
    second = asyncio.create_task(waiter(run_for("job-o"), effects.handler(0)))
    await asyncio.sleep(0.2)
    renew_down = True  # the holder's renewals fail first: the waiter sees its last stamp
    await asyncio.sleep(0.15)
    down = True
    gate.set()  # the handler ends while the store is away: its completion waits
    await asyncio.sleep(0.5)  # with the above, under the three leases a store keeps it
    down, renew_down, complete_back_at = False, False, time.monotonic() + 0.1
    assert await asyncio.wait_for(first, 5) is Outcome.COMPLETED
    assert await asyncio.wait_for(second, 5) is Outcome.DUPLICATE
    assert effects.what() == ["start", "done"], "job-o had exactly one effect"


# -- a lost lease cuts the run off ---------------------------------------------------------------


async def test_a_renewal_answered_not_yours_cuts_the_run_off() -> None:
    store, effects = MemoryIdempotencyStore(), Effects()

    async def taken(key: str, token: str, lease_s: float) -> bool:
        return False  # another delivery holds it now

    store.renew = taken  # type: ignore[method-assign]
    step = IdempotencyStep(store, IdempotencySettings(lease_s=0.3), owner="w1")
    run = run_for("job-r")
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(step(run, effects.handler(2.0)), 5)
    assert run.cut_off == "loss of its claim"
    assert effects.what() == ["start", "cancelled"]
    assert effects.when("cancelled") - started < 0.3  # at the first renewal, a third in


async def test_a_claim_not_renewable_for_a_lease_is_cut_off_before_anyone_takes_it_over() -> None:
    """The holder cannot reach the store (a partition); a waiter can. The holder is cut
    off when its lease ends, and the waiter starts only after that: never both at once."""
    store, effects = MemoryIdempotencyStore(), Effects()
    renew = store.renew

    async def unreachable_for_w1(key: str, token: str, lease_s: float) -> bool:
        if token.startswith("w1:"):
            raise ConnectionError("store unreachable from w1")
        return await renew(key, token, lease_s)

    store.renew = unreachable_for_w1  # type: ignore[method-assign]
    settings = IdempotencySettings(lease_s=0.3)
    holder = IdempotencyStep(store, settings, owner="w1")
    waiter = IdempotencyStep(store, settings, owner="w2")
    run = run_for("job-p")
    started = time.monotonic()
    first = asyncio.create_task(holder(run, effects.handler(3.0)))
    await wait_for(lambda: effects.what() == ["start"])
    assert await waiter(run_for("job-p"), effects.handler(0)) is Outcome.COMPLETED
    with pytest.raises(asyncio.CancelledError):
        await first
    assert run.cut_off == "loss of its claim"
    assert effects.what() == ["start", "cancelled", "start", "done"]
    assert 0.3 <= effects.when("cancelled") - started < 0.3 + 0.2
    assert effects.most_at_once == 1


# -- a completion that cannot be recorded yet ---------------------------------------------------


async def test_an_unrecorded_completion_keeps_the_claim_until_it_is_recorded() -> None:
    store, effects = MemoryIdempotencyStore(), Effects()
    complete, refusals = store.complete, 12

    async def refusing(key: str, token: str, retention_s: float) -> None:
        nonlocal refusals
        if refusals > 0:
            refusals -= 1
            raise ConnectionError("store refuses writes")
        await complete(key, token, retention_s)

    store.complete = refusing  # type: ignore[method-assign]
    settings = IdempotencySettings(lease_s=0.3)
    holder = IdempotencyStep(store, settings, owner="w1")
    waiter = IdempotencyStep(store, settings, owner="w2")
    first = asyncio.create_task(holder(run_for("job-c"), effects.handler(0.05)))
    await wait_for(lambda: effects.what() == ["start", "done"])
    # The completion is retried (about a second, over three leases): the claim stays
    # renewed, so the waiter never takes it over, and sees the completion once recorded.
    assert await waiter(run_for("job-c"), effects.handler(0)) is Outcome.DUPLICATE
    assert await first is Outcome.COMPLETED
    assert refusals == 0
    assert effects.what() == ["start", "done"], "one effect"


async def test_a_completion_never_recorded_stops_the_worker_past_its_bound() -> None:
    store = MemoryIdempotencyStore()

    async def down(key: str, token: str, retention_s: float) -> None:
        raise ConnectionError("store down")

    store.complete = down  # type: ignore[method-assign]
    settings = IdempotencySettings(lease_s=0.3, record_timeout_s=0.5)
    step = IdempotencyStep(store, settings, owner="w1")
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"could not record the completion of 'job-d'.*0\.5s"):
        await asyncio.wait_for(step(run_for("job-d"), Effects().handler(0)), 5)
    assert 0.5 <= time.monotonic() - started < 0.5 + 1.0
    assert await store.claim("job-d", "w2", 30) is ClaimState.BUSY, "never released as done"


# -- the real worker on the memory backend -------------------------------------------------------


class Long(Job, type="test.claims.long", version=1):
    pass


def worker_settings(**worker: Any) -> Settings:
    return Settings.model_validate(
        {
            "transport": "memory",
            "worker": {"commit_interval_s": 0.02, "ordering": "none", **worker},
            "idempotency": {"lease_s": 0.6},
        }
    )


class GoesOn:
    """An async handler whose first run goes on after the runtime cancels it (it swallows
    the cancellation) until the test lets it end; later runs end at once."""

    def __init__(self) -> None:
        self.app = App("claims")
        self.events: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.let_go = asyncio.Event()
        self.app.handler(Long)(self.handle)

    async def handle(self, job: Long, ctx: JobContext) -> None:
        first = not self.events
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.events.append("start")
        try:
            while first and not self.let_go.is_set():
                try:
                    await self.let_go.wait()
                except asyncio.CancelledError:
                    self.events.append("cancelled")
            self.events.append("end")
        finally:
            self.running -= 1


async def test_a_revoked_job_handed_back_to_the_same_worker_waits_for_the_run_going_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One worker, ordering `none`: the partition is revoked mid-run and handed back. The
    run, cut off, goes on; the worker reads the record again, and that delivery waits for
    the first run's claim instead of running the job a second time at once."""
    caplog.set_level(logging.INFO, "jobstream")
    handler = GoesOn()
    settings = worker_settings(revoke_timeout_s=0.2, cancel_grace_s=0.2)
    async with TestApp(handler.app, settings) as t:
        try:
            job = (await t.publish(Long())).job_id
            await wait_for(lambda: handler.events == ["start"])
            t.broker.faults.rebalance(settings.worker.group)
            await wait_for(
                lambda: any("held by another delivery" in r.getMessage() for r in caplog.records)
            )
            await asyncio.sleep(1.5)  # more than two leases: the run going on keeps its claim
            assert handler.events == ["start", "cancelled"], "the job did not run again"
        finally:
            handler.let_go.set()
        await t.drain(timeout_s=10)
    assert handler.events == ["start", "cancelled", "end", "start", "end"]
    assert handler.most_at_once == 1
    assert [(s.attempt, s.outcome) for s in t.settlements(job)] == [(1, Outcome.COMPLETED)]


async def test_a_lost_claim_cuts_the_run_off_unsettled_and_the_redelivery_completes_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "jobstream")
    taken = True
    renew = MemoryIdempotencyStore.renew

    async def renew_unless_taken(
        self: MemoryIdempotencyStore, key: str, token: str, lease_s: float
    ) -> bool:
        return False if taken else await renew(self, key, token, lease_s)

    monkeypatch.setattr(MemoryIdempotencyStore, "renew", renew_unless_taken)
    events: list[str] = []

    async def long_then_quick(job: Long, ctx: JobContext) -> None:
        events.append("start")
        if len(events) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
        events.append("end")

    app = App("claims-lost")
    app.handler(Long)(long_then_quick)
    async with TestApp(app, worker_settings()) as t:
        job = (await t.publish(Long())).job_id
        await wait_for(lambda: events == ["start", "cancelled"], 5)
        assert any("cut off by the loss of its claim" in r.getMessage() for r in caplog.records)
        await asyncio.sleep(0.2)
        assert t.settlements(job) == [], "a run cut off is never settled"
        taken = False
        t.broker.faults.rebalance(t.settings.worker.group)  # the record is read again
        await t.drain(timeout_s=10)
    assert events == ["start", "cancelled", "start", "end"]
    assert [(s.attempt, s.outcome) for s in t.settlements(job)] == [(1, Outcome.COMPLETED)]
