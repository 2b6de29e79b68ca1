"""A test app whose handler is `cpu_bound`, so it runs in the worker's process pool.

A job with `die_marker` set kills the pool process that runs it, as the OOM killer or a
segfault would, on its first run only (the marker file says it ran): the run after that
completes. Module-level and picklable, as a process pool needs.
"""

from __future__ import annotations

import os
import signal

from consumer import App, JobContext
from schemas import Job


class CrunchJob(Job, type="test.crunch", version=1):
    seq: int
    die_marker: str = ""


app = App("cpu")


@app.handler(CrunchJob, cpu_bound=True)
def crunch(job: CrunchJob, ctx: JobContext | None = None) -> None:
    if job.die_marker and not os.path.exists(job.die_marker):
        open(job.die_marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
