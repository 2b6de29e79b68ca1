"""The transaction step commits a transactional handler's writes only with its fenced
completion, rolls back whatever the runtime cancelled, and never reports an unanswered
COMMIT as done (issue 18). The database is a fake that records BEGIN, the completion,
COMMIT and ROLLBACK; tests/integration/test_outbox_transactional.py runs the real one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from consumer.core import CommitUnknown, Delivery, HandlerSpec, JobContext, JobRun, Outcome
from consumer.steps import TransactionalStore, TransactionStep
from schemas import Job, JobAttributes


class _Job(Job, type="unit.tx", version=1):
    pass


class FakeConnection:
    def __init__(self, log: list[str], commit_error: BaseException | None) -> None:
        self.log, self._commit_error = log, commit_error

    async def execute(self, query: str, *_: Any) -> None:
        self.log.append(query)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.log.append("BEGIN")
        try:
            yield
        except BaseException:
            self.log.append("ROLLBACK")
            raise
        if self._commit_error is not None:
            raise self._commit_error
        self.log.append("COMMIT")


class FakeStore:
    def __init__(self, *, fence_holds: bool = True, commit_error: BaseException | None = None):
        self.log: list[str] = []
        self._fence_holds, self._commit_error = fence_holds, commit_error

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeConnection]:
        yield FakeConnection(self.log, self._commit_error)

    async def complete_in(self, conn: Any, key: str, token: str, retention_s: float) -> bool:
        self.log.append(f"complete {key} {token}")
        return self._fence_holds


def transactional_run() -> JobRun:
    attributes = JobAttributes(id="job-1", type="unit.tx", source="/t", time=datetime.now(UTC))
    delivery = Delivery(partition=0, offset=0, topic="t", attributes=attributes, body=b"{}")
    spec = HandlerSpec(_Job, lambda *_: None, True, None, False, transactional=True)
    run = JobRun(delivery, _Job(), spec, JobContext(attributes))
    run.claim = ("job-1", "w1:0")
    return run


def writes(run: JobRun) -> Any:
    async def handler(_: JobRun) -> Outcome:
        assert run.context is not None
        await run.context.transaction.execute("INSERT effect")
        return Outcome.COMPLETED

    return handler


def test_the_fake_is_a_transactional_store() -> None:
    assert isinstance(FakeStore(), TransactionalStore)


async def test_effect_and_fenced_completion_commit_together() -> None:
    store = FakeStore()
    run = transactional_run()
    outcome = await TransactionStep(store, 60.0)(run, writes(run))
    assert outcome is Outcome.COMPLETED
    assert store.log == ["BEGIN", "INSERT effect", "complete job-1 w1:0", "COMMIT"]
    assert run.completed_in_transaction
    assert run.context is not None
    with pytest.raises(RuntimeError, match="transactional=True"):
        run.context.transaction  # noqa: B018 - lent for the handler's call only


async def test_a_claim_taken_over_rolls_back_and_the_run_is_cut_off() -> None:
    store = FakeStore(fence_holds=False)
    run = transactional_run()
    with pytest.raises(asyncio.CancelledError):
        await TransactionStep(store, 60.0)(run, writes(run))
    assert store.log == ["BEGIN", "INSERT effect", "complete job-1 w1:0", "ROLLBACK"]
    assert run.cut_off is not None  # the worker never settles it
    assert not run.completed_in_transaction


async def test_a_run_cut_off_while_its_handler_returned_rolls_back() -> None:
    store = FakeStore()
    run = transactional_run()

    async def swallows_its_cut_off(_: JobRun) -> Outcome:
        assert run.context is not None
        await run.context.transaction.execute("INSERT effect")
        run.cut_off = "drain timeout"  # the worker's record, written before it cancels
        return Outcome.COMPLETED

    with pytest.raises(asyncio.CancelledError):
        await TransactionStep(store, 60.0)(run, swallows_its_cut_off)
    assert store.log == ["BEGIN", "INSERT effect", "ROLLBACK"]


async def test_a_pending_cancellation_the_handler_swallowed_rolls_back() -> None:
    store = FakeStore()
    run = transactional_run()

    async def swallows(_: JobRun) -> Outcome:
        assert run.context is not None
        await run.context.transaction.execute("INSERT effect")
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as the timeout step does at the deadline
        with contextlib.suppress(
            asyncio.CancelledError
        ):  # swallowed: the handler returns as if done
            await asyncio.sleep(1)
        return Outcome.COMPLETED

    with pytest.raises(asyncio.CancelledError):
        await TransactionStep(store, 60.0)(run, swallows)
    assert store.log == ["BEGIN", "INSERT effect", "ROLLBACK"]


async def test_a_handler_failure_rolls_back_and_goes_on_to_the_failure_step() -> None:
    store = FakeStore()
    run = transactional_run()

    async def fails(_: JobRun) -> Outcome:
        assert run.context is not None
        await run.context.transaction.execute("INSERT effect")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await TransactionStep(store, 60.0)(run, fails)
    assert store.log == ["BEGIN", "INSERT effect", "ROLLBACK"]


async def test_a_commit_without_an_answer_is_never_reported_as_done() -> None:
    store = FakeStore(commit_error=psycopg.OperationalError("server closed the connection"))
    run = transactional_run()
    with pytest.raises(CommitUnknown, match="completion record decides"):
        await TransactionStep(store, 60.0)(run, writes(run))
    assert not run.completed_in_transaction
    assert CommitUnknown.retriable


async def test_a_handler_that_is_not_transactional_gets_no_transaction() -> None:
    store = FakeStore()
    run = transactional_run()
    assert run.spec is not None
    run.spec = HandlerSpec(_Job, lambda *_: None, True, None, False)

    async def plain(_: JobRun) -> Outcome:
        return Outcome.COMPLETED

    assert await TransactionStep(store, 60.0)(run, plain) is Outcome.COMPLETED
    assert store.log == []
