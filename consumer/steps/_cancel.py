"""Step: honour cancellation requests (`POST /v1/jobs/{id}/cancel`, `jobstream jobs cancel`).

A job cancelled before it starts is settled as CANCELLED without running. A running job is
told through `ctx.cancellation` (checked by a watcher every `status.cancel_poll_s`) and
stops cooperatively; whatever it returns or raises then, its outcome is CANCELLED, so it is
neither retried nor dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from consumer.core import JobContext, JobRun, Next, Outcome
from consumer.stores import StatusStore

log = logging.getLogger("jobstream.cancel")


class CancellationStep:
    def __init__(self, store: StatusStore, poll_s: float) -> None:
        self._store = store
        self._poll_s = poll_s
        self._running: dict[str, JobContext] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def __call__(self, run: JobRun, call_next: Next) -> Outcome:
        context = run.context
        if context is None:
            return await call_next(run)
        try:
            if await self._store.cancelled([context.job_id]):
                return Outcome.CANCELLED
        except Exception as error:  # noqa: BLE001 - an unreadable store must not stop jobs
            log.warning("could not check cancellation of %s: %s", context.job_id, error)
        self._running[context.job_id] = context
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="jobstream-cancel-watch")
        try:
            outcome = await call_next(run)
        except Exception:
            if context.cancelled:
                return Outcome.CANCELLED
            raise
        finally:
            self._running.pop(context.job_id, None)
        return Outcome.CANCELLED if context.cancelled else outcome

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while self._running:
            await asyncio.sleep(self._poll_s)
            try:
                cancelled = await self._store.cancelled(list(self._running))
            except Exception as error:  # noqa: BLE001 - checked again next period
                log.warning("could not check cancellations: %s", error)
                continue
            for job_id in cancelled:
                context = self._running.get(job_id)
                if context is not None and not context.cancelled:
                    context.cancellation.set("cancelled by request")
                    context.logger.info("cancellation requested")
