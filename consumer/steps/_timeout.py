"""Step: the per-job timeout. A job that runs out of time is a retriable failure.

The timeout's own record decides: once it expired the run is a `JobTimeout`, even if the
handler swallowed the cancellation and returned (the handler step ends a cancelled run
with `CancelledError` whatever the handler does, and waits for it `cancel_grace_s` at
most)."""

from __future__ import annotations

import asyncio

from consumer.core import JobRun, JobTimeout, Next, Outcome


def timeout_step(default_timeout_s: float) -> TimeoutStep:
    return TimeoutStep(default_timeout_s)


class TimeoutStep:
    def __init__(self, default_timeout_s: float) -> None:
        self._default = default_timeout_s

    def limit_for(self, run: JobRun) -> float:
        if run.spec is not None and run.spec.timeout_s is not None:
            return run.spec.timeout_s
        return self._default

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        limit = self.limit_for(run)
        try:
            async with asyncio.timeout(limit) as timer:
                outcome = await call_next(run)
        except TimeoutError:
            raise JobTimeout(limit) from None
        if timer.expired():
            raise JobTimeout(limit)
        return outcome
