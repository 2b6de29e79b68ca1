"""Step: turn a handler's exception into a settled outcome.

The failure is classified (`_failures.decide`): retry after a delay, or dead-letter. In
strict order mode (`retry.in_place`) a retry happens right here, in the job's lane, after
the backoff, so later jobs of the same key wait; otherwise the `FailureRouter` hands the
job to a retry tier or the dead-letter destination and returns once the broker
acknowledged it, so the offset is committed after the hand-off, never before.

A job cut off by shutdown (its task was cancelled) is not settled and is redelivered; a
`CancelledError` the handler raised by itself is an ordinary failure.

The exception and the record are untrusted: `decide` does not raise on them, and should
it still (a case nobody foresaw), the job is dead-lettered with reason
`undecidable-failure` instead of stopping the worker: bad data is the job's failure.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from consumer.core import (
    Decision,
    FailureRouter,
    JobRun,
    Next,
    Outcome,
    RetrySettings,
    decide,
    error_text,
    first_failure_stamp,
    utc_now,
)

log = logging.getLogger("jobstream.failure")


class RecordFailures:
    """The router of the in-memory setup: the failure is logged and the job settled as
    failed, so one bad job never blocks its partition."""

    async def route(self, run: JobRun, error: Exception, decision: Decision) -> Outcome:
        return Outcome.FAILED


class FailureStep:
    def __init__(self, router: FailureRouter, settings: RetrySettings) -> None:
        self._router = router
        self._settings = settings

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        while True:
            try:
                return await call_next(run)
            except asyncio.CancelledError as cancelled:
                if _cut_off(run):
                    raise  # the worker cut the job off (shutdown, revoke): leave it unsettled
                error: Exception = RuntimeError(f"handler raised CancelledError: {cancelled}")
            except Exception as caught:
                if _cut_off(run):
                    # The handler turned the runtime's cancellation into an error of its
                    # own: the run was cut off all the same, and is never settled.
                    raise asyncio.CancelledError from caught
                error = caught
            except BaseException as caught:
                # SystemExit, KeyboardInterrupt, GeneratorExit, an exception group or a
                # class of the handler's own: still the job's failure, never the worker's
                # (left to propagate, asyncio would stop the event loop with it).
                if _cut_off(run):
                    raise asyncio.CancelledError from caught
                name = type(caught).__name__
                error = RuntimeError(f"handler raised {name}: {error_text(caught)}")
                error.__cause__ = caught
            run.error = error
            now = utc_now()
            decision = self._decide(run, error, now)
            run.failure_reason = decision.reason
            if not (decision.retry and self._settings.in_place):
                return await self._router.route(run, error, decision)
            log.info(
                "retrying %s in place in %.1fs: %s",
                run.delivery.describe,
                decision.delay_s,
                error_text(error),
            )
            await asyncio.sleep(decision.delay_s)
            run.next_attempt(first_failure_stamp(run, now))

    def _decide(self, run: JobRun, error: Exception, now: datetime) -> Decision:
        try:
            return decide(run, error, self._settings, now=now)
        except Exception:
            log.exception("could not classify the failure of %s", run.delivery.describe)
            return Decision(retry=False, delay_s=0.0, reason="undecidable-failure")


def _cut_off(run: JobRun) -> bool:
    """Whether the runtime cut this run off: it recorded why (`JobRun.cut_off`), or it is
    cancelling the job's task (a cancellation the handler did not raise by itself)."""
    if run.cut_off is not None:
        return True
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
