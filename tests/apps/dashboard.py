"""The dashboard tests' app: a job whose cause of failure the test controls.

`test.dash` fails (`ValueError`, its message holding markup from the job's `note`) while
the file `<JOBSTREAM_TEST_BROKEN>/<name>` exists, so it dead-letters; once the test removes
the file ("fixes the cause"), a replay succeeds. `wait: true` runs until cancelled (at
most a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from consumer import App, JobContext
from schemas import Job


class DashJob(Job, type="test.dash", version=1):
    name: str
    note: str = ""
    wait: bool = False


app = App("dashboard-tests")


@app.handler(DashJob)
async def handle(job: DashJob, ctx: JobContext) -> None:
    if job.wait:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.cancellation.wait(), timeout=60)
        return
    broken = Path(os.environ.get("JOBSTREAM_TEST_BROKEN", "/nonexistent")) / job.name
    if broken.exists():
        msg = f"cannot render {job.note} for {job.name}"
        raise ValueError(msg)
