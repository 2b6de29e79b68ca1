"""A test app with one cron schedule, a tick every 2 s, for the evidence of issue 15: every
run of a tick is appended to the sink file (`JOBSTREAM_TEST_SINK`) as one line,
`job_id tick pid start end outcome`, with a single `os.write` on an O_APPEND descriptor,
so lines of concurrent worker processes never interleave."""

from __future__ import annotations

import os
import time

from consumer import App, JobContext
from schemas import Job


class CronTick(Job, type="test.cron.tick", version=1):
    pass


app = App("cron-evidence")
_sink: list[int] = []


def _write(line: str) -> None:
    if not _sink:
        path = os.environ["JOBSTREAM_TEST_SINK"]
        _sink.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_sink[0], line.encode())


@app.cron("*/2 * * * * *")
@app.handler(CronTick)
async def tick(job: CronTick, ctx: JobContext) -> None:
    start = time.time()
    when = (ctx.attributes.subject or "?").rsplit("/", 1)[-1]
    _write(f"{ctx.job_id} {when} {os.getpid()} {start:.6f} {time.time():.6f} done\n")
