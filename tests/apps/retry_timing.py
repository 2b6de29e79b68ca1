"""A test app for retry timing (issue 13, K9 and K10): each job says how it fails, and every
attempt is recorded with its time, for in-process workers.

`behaviour`:
- `retry`: `Retry(delay_s=job.delay_s)` on every attempt up to `job.fail_attempts`, then
  completes (`fail_attempts=0`: fails on every attempt);
- `error`: a plain retriable error on every attempt, the policy's delay;
- `hang`: waits until the worker cuts it off (a drain timeout) or is killed.

With `RETRY_TIMING_MARKS` set (a file path), each attempt's job id is also appended to that
file, for workers in other processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from dataclasses import dataclass

from consumer import App, JobContext, Retry
from schemas import Job


class TimedJob(Job, type="test.timed", version=1):
    behaviour: str
    delay_s: float = 0.0
    fail_attempts: int = 0


@dataclass(frozen=True)
class Attempt:
    attempt: int
    started: float  # time.monotonic()
    at: float  # time.time(), to compare with the failure times of a dead letter


app = App("retry-timing")
ATTEMPTS: defaultdict[str, list[Attempt]] = defaultdict(list)


@app.handler(TimedJob)
async def handle(job: TimedJob, ctx: JobContext) -> None:
    ATTEMPTS[ctx.job_id].append(Attempt(ctx.attempt, time.monotonic(), time.time()))
    marks = os.environ.get("RETRY_TIMING_MARKS")
    if marks:
        with open(marks, "a") as out:  # noqa: ASYNC230 - a test's line, before the work
            out.write(f"{ctx.job_id}\n")
    match job.behaviour:
        case "retry" if job.fail_attempts == 0 or ctx.attempt <= job.fail_attempts:
            raise Retry(delay_s=job.delay_s)
        case "error":
            raise RuntimeError("always fails")
        case "hang":
            await asyncio.Event().wait()
        case _:
            return
