"""Step: turn a handler's exception into a settled outcome through a `FailureRouter`.

The router decides where a failed job goes (a retry tier, the dead-letter topic) and
returns only once the broker acknowledged it, so the offset is committed after the hand-
off, never before. A job cut off by shutdown (its task was cancelled) is not settled and
is redelivered; a `CancelledError` the handler raised by itself is an ordinary failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from consumer._pipeline import JobRun, Next, Outcome

log = logging.getLogger("jobstream.failure")


class FailureRouter(Protocol):
    async def route(self, run: JobRun, error: Exception) -> Outcome:
        """Hand the failed job on (broker-acknowledged) and say how it was settled."""


class RecordFailures:
    """The router without retry topics: the failure is logged and the job settled as failed,
    so one bad job never blocks its partition."""

    async def route(self, run: JobRun, error: Exception) -> Outcome:
        return Outcome.FAILED


class FailureStep:
    def __init__(self, router: FailureRouter) -> None:
        self._router = router

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        try:
            return await call_next(run)
        except asyncio.CancelledError as cancelled:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker cut the job off (shutdown, revoke): leave it unsettled
            # The handler itself raised CancelledError (a task it awaited was cancelled):
            # an ordinary, retriable failure of this job.
            error = RuntimeError(f"handler raised CancelledError: {cancelled}")
            run.error = error
            return await self._router.route(run, error)
        except Exception as error:  # noqa: BLE001 - every handler failure is routed
            run.error = error
            return await self._router.route(run, error)
