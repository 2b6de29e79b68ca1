"""A test app whose handler records every run to a sink file, one line per run.

Each line is appended with a single `os.write` on an O_APPEND descriptor, so lines from
concurrent workers never interleave and a SIGKILL loses at most the run it interrupted.
Line format: `job_id key seq pid attempt start end outcome` (times from time.time()).

`app` runs every behaviour in an async handler; `sync_app` handles the same job type with a
plain (sync) handler, run in the worker's thread pool, for the behaviours of threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from typing import Literal

from consumer import App, DeadLetter, JobContext, Retry
from schemas import Job


class RecordJob(Job, type="test.record", version=1):
    seq: int
    key: str
    sleep_ms: int = 0
    behaviour: Literal[
        "ok",
        "raise",
        "fail-once",
        "fail-twice",
        "dead-letter",
        "hang",
        "hang-once",
        "cancelled",
        "wait-cancel",
        "swallow-cancel-return",
        "swallow-cancel-forever",
        "sync-hang",
    ] = "ok"


app = App("recorder")
sync_app = App("recorder-sync")
WORKER_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar("worker", default=None)
"""Who ran a job, for in-process workers (the memory backend): the sink's `pid` field.
A worker's tasks inherit it from the task that started the worker."""
_sinks: dict[str, int] = {}


def _sink() -> int:
    # One descriptor per sink path: in-process tests point the env var at their own file.
    path = os.environ["JOBSTREAM_TEST_SINK"]
    if path not in _sinks:
        _sinks[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _sinks[path]


def record(job: RecordJob, ctx: JobContext, start: float, outcome: str) -> None:
    line = (
        f"{ctx.job_id} {job.key} {job.seq} {WORKER_ID.get() or os.getpid()} {ctx.attempt} "
        f"{start:.6f} {time.time():.6f} {outcome}\n"
    )
    os.write(_sink(), line.encode())


def first_run(ctx: JobContext) -> bool:
    """True on the job's first run anywhere (a marker file next to the sink says it ran)."""
    marker = f"{os.environ['JOBSTREAM_TEST_SINK']}.{ctx.job_id}.ran"
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


@app.handler(RecordJob)
async def handle(job: RecordJob, ctx: JobContext) -> None:
    start = time.time()
    record(job, ctx, start, "start")
    if os.environ.get("JOBSTREAM_TEST_BROKEN"):
        record(job, ctx, start, "raised")
        raise DeadLetter("broken deployment")
    if job.behaviour == "hang":
        await asyncio.sleep(3600)
    if job.behaviour == "hang-once" and first_run(ctx):
        # Hangs on its first run anywhere, completes afterwards.
        await asyncio.sleep(3600)
    if job.behaviour == "swallow-cancel-return" and first_run(ctx):
        # Cleans up on cancellation, then returns as if it were done (first run only).
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            record(job, ctx, start, "cancel-swallowed")
            return
    if job.behaviour == "swallow-cancel-forever" and first_run(ctx):
        # Swallows every cancellation and carries on (first run only).
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                record(job, ctx, start, "cancel-swallowed")
    if job.behaviour == "wait-cancel":
        # A cooperative long job: stops as soon as it is told to.
        await asyncio.wait_for(ctx.cancellation.wait(), 60)
        record(job, ctx, start, "cancel-seen")
        return
    if job.behaviour == "cancelled":
        inner = asyncio.create_task(asyncio.sleep(3600))
        inner.cancel()
        record(job, ctx, start, "raised")
        await inner
    if job.sleep_ms:
        await asyncio.sleep(job.sleep_ms / 1000)
    if job.behaviour == "raise":
        record(job, ctx, start, "raised")
        raise RuntimeError(f"job {job.seq} always fails")
    if (job.behaviour == "fail-once" and ctx.attempt < 2) or (
        job.behaviour == "fail-twice" and ctx.attempt < 3
    ):
        record(job, ctx, start, "raised")
        raise Retry(f"job {job.seq} fails on attempt {ctx.attempt}")
    if job.behaviour == "dead-letter":
        record(job, ctx, start, "raised")
        raise DeadLetter(f"job {job.seq} cannot be done")
    record(job, ctx, start, "done")


@sync_app.handler(RecordJob)
def handle_in_thread(job: RecordJob, ctx: JobContext) -> None:
    """`ok` and `sync-hang`: blocks its thread for an hour on its first run anywhere (as a
    hung socket would), completes afterwards."""
    start = time.time()
    record(job, ctx, start, "start")
    if job.behaviour == "sync-hang" and first_run(ctx):
        threading.Event().wait(3600)
    record(job, ctx, start, "done")
