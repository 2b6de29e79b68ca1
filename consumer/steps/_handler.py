"""Step: run the handler. Async handlers on the loop, sync ones in a thread pool,
`cpu_bound` ones in a process pool (called with the job only: contexts hold loggers and
events that cannot cross a process boundary)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import Executor

from consumer.core import JobRun, Outcome


class HandlerStep:
    def __init__(self, threads: Executor, processes: Executor | None) -> None:
        self._threads = threads
        self._processes = processes

    async def __call__(self, run: JobRun) -> Outcome:
        if run.decode_error is not None:
            raise run.decode_error
        spec, job, context = run.spec, run.job, run.context
        assert spec is not None
        assert job is not None
        assert context is not None
        loop = asyncio.get_running_loop()
        if spec.is_async:
            await spec.func(job, context)
        elif spec.cpu_bound and self._processes is not None:
            await loop.run_in_executor(self._processes, spec.func, job)
        else:
            # Copy the context so spans and loggers set around the call are seen in the thread.
            call = functools.partial(contextvars.copy_context().run, spec.func, job, context)
            await loop.run_in_executor(self._threads, call)
        return Outcome.COMPLETED
