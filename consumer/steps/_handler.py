"""Step: run the handler. Async handlers in the job's own task (no task of their own: the
per-job path stays cheap), sync ones in a thread pool, `cpu_bound` ones in a process pool
(called with the job only: contexts hold loggers and events that cannot cross a process
boundary).

What this step guarantees when its run is cancelled (the worker cut it off at the drain or
revoke timeout, or its job timeout expired):

- the handler is told: an async one is cancelled at its current `await`; for a runtime
  cut-off, `ctx.cancellation` is set too, which a sync handler can poll;
- the run ends with `CancelledError` whatever the handler does then: a value it returns
  after swallowing a cut-off is never taken for a finished run (`JobRun.cut_off` is the
  runtime's record), nor after swallowing its timeout (`TimeoutStep` checks its timer);
- a thread or a pool process is waited for `grace_s` at most, then left running,
  abandoned: logged with its job and kept in `abandoned` until it ends, so the worker can
  report (and the CLI not wait for) what is still running. An async handler that swallows
  every cancellation keeps its job's task: the worker waits for it a bounded time at a
  cut-off and then abandons the task (`runtime/_cut_offs.py`); while it runs on past its
  timeout the worker reports it (`Worker.overruns`) and its offset is never committed.

A pool process that dies (killed, out of memory, a crash in native code) breaks its whole
pool: every call on it ends with `BrokenProcessPool`. The step then replaces the pool (once
per broken pool, whichever call sees it first) and runs each of those calls again on the
new one, `_RESUBMITS` times at most per run; only then is the error the job's failure (a
job that kills its process every time is retried, then dead-lettered, by the policy).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

from consumer.core import JobRun, Outcome

log = logging.getLogger("jobstream.worker")

Where = Literal["task", "thread", "process"]
_RESUBMITS = 2  # runs of one job on a fresh pool after its pool broke under it


@dataclass(frozen=True, slots=True)
class AbandonedRun:
    """A handler call the runtime cancelled and stopped waiting for; it may still run."""

    job_id: str | None
    """The job's id (None for a record without job attributes)."""
    delivery: str
    """Where the record was read (`topic[partition]@offset`)."""
    where: Where
    """What runs it: an event-loop task, a pool thread or a pool process."""
    reason: str
    """Why it was cancelled: the drain or revoke timeout, or its job timeout."""


@dataclass(slots=True)
class _Call:
    """One handler call: what the step awaits, and what says whether it still runs."""

    future: asyncio.Future[Any]
    running: asyncio.Future[Any] | concurrent.futures.Future[Any]
    where: Where
    pool: Executor


class HandlerStep:
    def __init__(
        self, threads: Executor, processes: Callable[[], Executor] | None, grace_s: float
    ) -> None:
        """`processes` makes the process pool for `cpu_bound` handlers (again when one
        broke); None runs them in `threads`."""
        self._threads = threads
        self._new_processes = processes
        self._processes = processes() if processes is not None else None
        self._grace_s = grace_s
        self.abandoned: dict[int, AbandonedRun] = {}
        """Handler calls cut off and still running, by call; each leaves when it ends."""
        self._calls: dict[int, _Call] = {}  # by run: what `interrupt` cancels

    @property
    def processes(self) -> Executor | None:
        """The process pool in use (a new one after the previous one broke)."""
        return self._processes

    def interrupt(self, run: JobRun) -> None:
        """Tell `run`'s handler to stop now, before its job's task hears of it: a thread or
        process call is cancelled, and `ctx.cancellation` is set for a runtime cut-off."""
        if run.cut_off is not None and run.context is not None:
            run.context.cancellation.set(run.cut_off)
        call = self._calls.get(id(run))
        if call is not None:
            call.future.cancel()

    async def __call__(self, run: JobRun) -> Outcome:
        if run.decode_error is not None:
            raise run.decode_error
        spec = run.spec
        assert spec is not None
        if spec.is_async:
            assert run.job is not None
            assert run.context is not None
            await spec.func(run.job, run.context)  # its CancelledError passes through
            if run.cut_off is not None:  # it swallowed the cut-off and returned
                raise asyncio.CancelledError(run.cut_off)
            return Outcome.COMPLETED
        resubmits = 0
        while True:
            call = self._calls[id(run)] = self._start(run)
            try:
                await asyncio.wait((call.future,))
            except asyncio.CancelledError:
                await self._stop(run, call)
                raise
            finally:
                del self._calls[id(run)]
            try:
                call.future.result()  # the handler's exception, or its own CancelledError
            except BrokenProcessPool:
                if call.where != "process" or resubmits >= _RESUBMITS:
                    raise
                resubmits += 1
                self._replace_broken(call.pool, run)
                continue
            return Outcome.COMPLETED

    def _start(self, run: JobRun) -> _Call:
        spec, job, context = run.spec, run.job, run.context
        assert spec is not None
        assert job is not None
        assert context is not None
        pool = self._processes
        if spec.cpu_bound and pool is not None:
            try:
                submitted = pool.submit(spec.func, job)
            except BrokenProcessPool:  # broken since the last call ended: not this job's doing
                pool = self._replace_broken(pool, run)
                submitted = pool.submit(spec.func, job)
            return _Call(asyncio.wrap_future(submitted), submitted, "process", pool)
        # Copy the context so spans and loggers set around the call are seen in the thread.
        call = functools.partial(contextvars.copy_context().run, spec.func, job, context)
        submitted = self._threads.submit(call)
        return _Call(asyncio.wrap_future(submitted), submitted, "thread", self._threads)

    def _replace_broken(self, broken: Executor, run: JobRun) -> Executor:
        """A new process pool in place of `broken`, unless another call replaced it already."""
        assert self._new_processes is not None
        assert self._processes is not None
        if broken is self._processes:
            broken.shutdown(wait=False, cancel_futures=True)
            self._processes = self._new_processes()
            log.warning(
                "a process of the cpu_bound pool died (killed, out of memory or crashed) "
                "while it ran job %s or one beside it: pool replaced, its jobs run again",
                run.attributes.id if run.attributes is not None else None,
            )
        return self._processes

    async def _stop(self, run: JobRun, call: _Call) -> None:
        """Tell the handler to stop, wait `grace_s` at most, abandon it if it runs on."""
        reason = run.cut_off or "job timeout"
        if run.cut_off is not None and run.context is not None:
            run.context.cancellation.set(run.cut_off)
        call.future.cancel()  # an executor's pending call is dropped; a running one is not
        running = call.running
        ended = asyncio.Event()
        _when_done(running, ended.set)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._grace_s):
                await ended.wait()
        if running.done():
            _retrieve(running)
            return
        attributes = run.attributes
        key = id(running)
        self.abandoned[key] = abandoned = AbandonedRun(
            attributes.id if attributes is not None else None,
            run.delivery.describe,
            call.where,
            reason,
        )
        log.warning(
            "abandoned the handler of job %s (%s, %s): still running %.1fs after it was "
            "cancelled (%s); not settled",
            abandoned.job_id,
            abandoned.delivery,
            abandoned.where,
            self._grace_s,
            reason,
        )

        # The run's claim is kept until the call really ends (`JobRun.handler_running`).
        ended_for_good = run.handler_running = asyncio.get_running_loop().create_future()

        def forget() -> None:
            _retrieve(running)
            if not ended_for_good.done():
                ended_for_good.set_result(None)
            if self.abandoned.pop(key, None) is not None:
                log.info("the abandoned handler of job %s ended", abandoned.job_id)

        _when_done(running, forget)


def _when_done(
    future: asyncio.Future[Any] | concurrent.futures.Future[Any], callback: Callable[[], None]
) -> None:
    """Call `callback` on the loop once `future` is done; a thread's or a process's future
    ends off the loop, so the call is handed over to it."""
    if isinstance(future, asyncio.Future):
        future.add_done_callback(lambda _: callback())
        return
    loop = asyncio.get_running_loop()

    def hand_over(_: concurrent.futures.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to tell
            loop.call_soon_threadsafe(callback)

    future.add_done_callback(hand_over)


def _retrieve(future: asyncio.Future[Any] | concurrent.futures.Future[Any]) -> None:
    """Read a finished call's exception, so none is reported as never retrieved: after a
    cut-off, what the handler returned or raised has no say."""
    if not future.cancelled():
        future.exception()
