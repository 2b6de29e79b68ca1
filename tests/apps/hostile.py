"""A test app whose handler fails in the ways a handler outside our control can: huge or
unprintable messages, an exception whose `__str__` raises, nonsense retry delays.

Each run is counted in `RUNS` (job id -> attempts seen), for in-process workers.
"""

from __future__ import annotations

import collections

from consumer import App, JobContext, Retry
from schemas import Job


class HostileJob(Job, type="test.hostile", version=1):
    behaviour: str
    padding: str = ""


class UnprintableError(Exception):
    """An exception whose message cannot be read: `str()` raises."""

    def __str__(self) -> str:
        msg = "__str__ is broken"
        raise RuntimeError(msg)


app = App("hostile")
RUNS: collections.Counter[str] = collections.Counter()


@app.handler(HostileJob)
async def handle(job: HostileJob, ctx: JobContext) -> None:
    RUNS[ctx.job_id] += 1
    match job.behaviour:
        case "emoji":
            raise RuntimeError("\N{GRINNING FACE}" * 3000)
        case "unprintable":
            raise UnprintableError
        case "surrogates":
            raise RuntimeError("bad \udcff text \ud800" * 500)
        case "nan-delay":
            raise Retry(delay_s=float("nan"))
        case "inf-delay":
            raise Retry(delay_s=float("inf"))
        case "huge-delay":
            raise Retry(delay_s=1e12)
        case "negative-delay":
            raise Retry(delay_s=-5.0)
        case "fail-once" if ctx.attempt == 1:
            raise RuntimeError("fails on its first attempt")
        case "fail":
            raise RuntimeError("always fails")
        case _:
            return
