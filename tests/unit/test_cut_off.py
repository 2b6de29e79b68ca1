"""Work the runtime cut off is never settled (issue 13, K3), on the memory backend.

The runtime's own record decides whether a run finished, not the handler's return value:
a run cut off by the drain timeout, by a revoke or by its job timeout settles nothing as
completed, however the handler ends (it swallows the cancellation and returns, returns
through `asyncio.shield`, catches `BaseException`, carries on, or blocks its thread).
Every wait after a cancellation is bounded by `worker.cancel_grace_s`; what is still
running then is abandoned and reported. The same with real processes and SIGTERM:
`tests/integration/test_cut_off.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import pytest

from consumer import App, DeadLetter, JobContext
from consumer.core import Outcome, Settings
from consumer.memory import TestApp
from consumer.runtime._cut_offs import CLEANUP_S
from schemas import Job

Mode = Literal[
    "swallow-return",
    "shield-return",
    "base-exception",
    "swallow-forever",
    "raise-error",
    "raise-dead-letter",
]
GRACE_S = 0.3


class Stubborn(Job, type="test.cutoff.stubborn", version=1):
    mode: Mode


class Timed(Job, type="test.cutoff.timed", version=1):
    mode: Mode


class Blocking(Job, type="test.cutoff.blocking", version=1):
    pass


class Handlers:
    """An app whose handlers resist cancellation on a job's first run, and complete on
    later runs. `events` lists (job id, what happened); `release` ends every stubborn
    first run (the test sets it last, so nothing outlives the test)."""

    def __init__(self) -> None:
        self.app = App("cut-off")
        self.events: list[tuple[str, str]] = []
        self.release = threading.Event()
        self._released = asyncio.Event()
        self.app.handler(Stubborn)(self.stubborn)
        self.app.handler(Timed, timeout_s=0.2)(self.stubborn)
        self.app.handler(Blocking)(self.blocking)

    def first(self, ctx: JobContext, what: str) -> bool:
        first = not any(job == ctx.job_id for job, _ in self.events)
        self.events.append((ctx.job_id, what))
        return first

    async def stubborn(self, job: Stubborn | Timed, ctx: JobContext) -> None:
        if not self.first(ctx, "start"):
            self.events.append((ctx.job_id, "done"))
            return
        if job.mode == "swallow-return":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.events.append((ctx.job_id, "cancelled"))
                return
        elif job.mode == "shield-return":
            inner = asyncio.ensure_future(self._released.wait())
            try:
                await asyncio.shield(inner)
            except asyncio.CancelledError:
                self.events.append((ctx.job_id, "cancelled"))
                inner.cancel()
                return
        elif job.mode in ("raise-error", "raise-dead-letter"):
            # The cancellation turned into a failure of the handler's own: still a cut-off.
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.events.append((ctx.job_id, "cancelled"))
                if job.mode == "raise-error":
                    raise ValueError("cleanup failed") from None
                raise DeadLetter("give up") from None
        elif job.mode == "base-exception":
            try:
                await asyncio.sleep(3600)
            except BaseException:
                self.events.append((ctx.job_id, "cancelled"))
                return
        else:  # swallow-forever: every cancellation, until the test releases it
            while not self.release.is_set():
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    self.events.append((ctx.job_id, "cancelled"))
        self.events.append((ctx.job_id, "returned"))

    def blocking(self, job: Blocking, ctx: JobContext) -> None:
        if not self.first(ctx, "start"):
            self.events.append((ctx.job_id, "done"))
            return
        self.release.wait(30)  # a thread stuck as on a hung socket, until released
        self.events.append((ctx.job_id, "returned"))

    def happened(self, job_id: str) -> list[str]:
        return [what for job, what in self.events if job == job_id]


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


def settings(**worker: Any) -> Settings:
    return Settings.model_validate(
        {
            "transport": "memory",
            "worker": {"commit_interval_s": 0.02, "cancel_grace_s": GRACE_S, **worker},
            "retry": {"policy": {"initial_delay_s": 0.05, "jitter": 0}, "tiers_s": [0.05]},
        }
    )


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def outcomes(t: TestApp, job_id: str) -> list[tuple[int, Outcome]]:
    return [(s.attempt, s.outcome) for s in t.settlements(job_id)]


# -- shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    ["swallow-return", "shield-return", "base-exception", "raise-error", "raise-dead-letter"],
)
async def test_a_run_cut_off_by_the_drain_is_not_settled_whatever_the_handler_returns(
    handlers: Handlers, mode: Mode
) -> None:
    async with TestApp(handlers.app, settings(drain_timeout_s=0.2)) as t:
        receipt = await t.publish(Stubborn(mode=mode))
        job = receipt.job_id
        await until(lambda: handlers.happened(job) == ["start"], 5, "the job started")
        await t.stop_worker(0)
        assert handlers.happened(job) == ["start", "cancelled"]
        assert outcomes(t, job) == [], "a cut-off run settles nothing"
        assert t.dead_letters() == [], "nor is it dead-lettered or retried"
        group, partition = t.settings.worker.group, receipt.partition or 0
        committed = t.broker.committed(group, receipt.destination, partition)
        assert committed in (None, receipt.offset), "its offset is not committed"
        await t.add_worker()  # the redelivery runs it: nothing recorded it as completed
        await t.drain(timeout_s=5)
    assert outcomes(t, job) == [(1, Outcome.COMPLETED)]
    assert handlers.happened(job) == ["start", "cancelled", "start", "done"]


async def test_a_handler_that_swallows_every_cancel_does_not_hold_the_shutdown(
    handlers: Handlers,
) -> None:
    drain_s = 0.2
    try:
        async with TestApp(handlers.app, settings(drain_timeout_s=drain_s)) as t:
            job = (await t.publish(Stubborn(mode="swallow-forever"))).job_id
            await until(lambda: handlers.happened(job) == ["start"], 5, "the job started")
            stopping = time.monotonic()
            await asyncio.wait_for(t.stop_worker(0), drain_s + GRACE_S + 3)
            # the drain, then the bounded wait for a cut-off run (grace + the steps' clean-up)
            assert time.monotonic() - stopping < drain_s + GRACE_S + CLEANUP_S + 0.5
            assert "cancelled" in handlers.happened(job)
            assert "returned" not in handlers.happened(job), "still running, abandoned"
            assert [a.job_id for a in t.workers[0].abandoned] == [job]
            assert outcomes(t, job) == []
            handlers.release.set()
            await until(lambda: "returned" in handlers.happened(job), 5, "the stubborn run")
            await asyncio.sleep(0.05)
            assert outcomes(t, job) == [], "its late return settles nothing either"
            await t.add_worker()
            await t.drain(timeout_s=5)
        assert outcomes(t, job) == [(1, Outcome.COMPLETED)]
    finally:
        handlers.release.set()


# -- revoke ------------------------------------------------------------------------------


async def test_a_run_cut_off_by_a_revoke_is_not_settled_and_runs_again(
    handlers: Handlers,
) -> None:
    async with TestApp(handlers.app, settings(revoke_timeout_s=0.2)) as t:
        job = (await t.publish(Stubborn(mode="swallow-return"))).job_id
        await until(lambda: handlers.happened(job) == ["start"], 5, "the job started")
        t.broker.faults.rebalance(t.settings.worker.group)
        await until(lambda: "cancelled" in handlers.happened(job), 3, "the revoke's cut-off")
        await t.drain(timeout_s=5)
    assert outcomes(t, job) == [(1, Outcome.COMPLETED)]
    assert handlers.happened(job) == ["start", "cancelled", "start", "done"]


async def test_a_revoke_abandons_a_thread_stuck_in_its_handler_and_reports_it(
    handlers: Handlers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "jobstream")
    caplog.set_level(logging.INFO, "jobstream.idempotency")

    def logged(text: str) -> bool:
        return any(text in r.getMessage() and job in r.getMessage() for r in caplog.records)

    try:
        async with TestApp(handlers.app, settings(revoke_timeout_s=0.2)) as t:
            job = (await t.publish(Blocking())).job_id
            await until(lambda: handlers.happened(job) == ["start"], 5, "the job started")
            t.broker.faults.rebalance(t.settings.worker.group)
            await until(lambda: logged("abandon"), 5, "the stuck thread abandoned")
            # The redelivery (to the same worker) waits: the stuck thread keeps the claim
            # (issue 13, K4), so the job never runs twice at once.
            await until(lambda: logged("held by another delivery"), 5, "the redelivery waits")
            assert handlers.happened(job) == ["start"]
            handlers.release.set()  # the stuck thread ends: its return settles nothing
            await t.drain(timeout_s=5)  # then the redelivery runs, in another thread
            assert handlers.happened(job) == ["start", "returned", "start", "done"]
        assert outcomes(t, job) == [(1, Outcome.COMPLETED)]
    finally:
        handlers.release.set()


# -- job timeout ---------------------------------------------------------------------------


async def test_a_handler_that_swallows_its_timeout_and_returns_has_timed_out(
    handlers: Handlers,
) -> None:
    async with TestApp(handlers.app, settings()) as t:
        job = (await t.publish(Timed(mode="swallow-return"))).job_id
        await t.drain(timeout_s=5)
    assert outcomes(t, job) == [(1, Outcome.RETRYING), (2, Outcome.COMPLETED)]
    assert handlers.happened(job) == ["start", "cancelled", "start", "done"]


async def test_a_handler_that_swallows_every_timeout_cancel_is_reported_and_never_settled(
    handlers: Handlers,
) -> None:
    """An async handler that ignores its timeout keeps its job's task (the handler runs in
    it, for a cheap per-job path): the worker reports it and settles nothing until it
    ends; then the timeout's record makes it a retried `JobTimeout`, never a completion."""
    try:
        async with TestApp(handlers.app, settings()) as t:
            job = (await t.publish(Timed(mode="swallow-forever"))).job_id
            worker = t.workers[0]
            await until(lambda: bool(worker.overruns), 0.2 + GRACE_S + 2, "the overrun report")
            assert len(worker.overruns) == 1
            assert outcomes(t, job) == [], "an overrunning run is not settled"
            handlers.release.set()
            await t.drain(timeout_s=5)
        assert outcomes(t, job) == [(1, Outcome.RETRYING), (2, Outcome.COMPLETED)]
    finally:
        handlers.release.set()
