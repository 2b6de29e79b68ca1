"""Step: the per-job timeout. A job that runs out of time is a retriable failure.

The timeout's own record decides: once it expired the run is a `JobTimeout`, even if the
handler swallowed the cancellation and returned (the handler step ends a cancelled run
with `CancelledError` whatever the handler does, and waits for it `cancel_grace_s` at
most).

One deadline sweep per limit serves every running job, not a timer per job (issue 16: a
per-job `asyncio.timeout` cost 7 to 9 µs of CPU): `core.DueQueue`. A run past its deadline
is cancelled as `asyncio.timeout` would do it (`Task.cancel`, then `Task.uncancel` in this
step, so another cancellation, a cut-off, still passes through as `CancelledError`).
"""

from __future__ import annotations

import asyncio

from consumer.core import DueQueue, JobRun, JobTimeout, Next, Outcome


class _Timed:
    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.expired = False


def _expire(timed: _Timed) -> None:
    timed.expired = True
    timed.task.cancel()


class TimeoutStep:
    def __init__(self, default_timeout_s: float) -> None:
        self._default = default_timeout_s
        self._deadlines: dict[float, DueQueue[_Timed]] = {}  # by limit (s)

    def limit_for(self, run: JobRun) -> float:
        if run.spec is not None and run.spec.timeout_s is not None:
            return run.spec.timeout_s
        return self._default

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        limit = self.limit_for(run)
        task = run.task or asyncio.current_task()
        assert task is not None
        deadlines = self._deadlines.get(limit)
        if deadlines is None:
            deadlines = self._deadlines[limit] = DueQueue(limit, _expire)
        timed = _Timed(task)
        key = deadlines.add(timed, task.get_loop())
        cancelling = task.cancelling()
        try:
            outcome = await call_next(run)
        except asyncio.CancelledError:
            # Ours only when no other cancellation is pending (as in `asyncio.timeout`).
            if timed.expired and task.uncancel() <= cancelling:
                raise JobTimeout(limit) from None
            raise
        finally:
            deadlines.discard(key)
        if timed.expired:  # the handler swallowed its timeout's cancellation and returned
            task.uncancel()
            raise JobTimeout(limit)
        return outcome
