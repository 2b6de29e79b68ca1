"""Step: turn a handler's exception into a settled outcome through a `FailureRouter`.

The router decides where a failed job goes (a retry tier, the dead-letter topic) and
returns only once the broker acknowledged it, so the offset is committed after the hand-
off, never before. `asyncio.CancelledError` is not caught: a job cut off by shutdown is
not settled and is redelivered.
"""

from __future__ import annotations

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
        except Exception as error:  # noqa: BLE001 - every handler failure is routed
            run.error = error
            return await self._router.route(run, error)
