"""The chaos run's app (`python -m tests.chaos`): every run of a job inserts one effect row.

The effects table lives in a PostgreSQL that the chaos never restarts
(`JOBSTREAM_CHAOS_EFFECTS_URL`), one row per run with the job id, its sequence number, the
worker's pid and the attempt, so the runner counts effects by job id after the faults: a
missing id is a lost job, a second row is a second run.
"""

from __future__ import annotations

import asyncio
import os

from psycopg_pool import AsyncConnectionPool

from consumer import App, JobContext
from schemas import Job

TABLE = "chaos_effects"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    run text NOT NULL,
    job_id text NOT NULL,
    seq integer NOT NULL,
    key text NOT NULL,
    pid integer NOT NULL,
    attempt integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class ChaosJob(Job, type="chaos.effect", version=1):
    seq: int
    work_ms: int = 20


app = App("chaos")
_pools: dict[str, AsyncConnectionPool] = {}  # one per process, opened by the first job
_opening = asyncio.Lock()


async def _effects() -> AsyncConnectionPool:
    url = os.environ["JOBSTREAM_CHAOS_EFFECTS_URL"]
    async with _opening:
        if url not in _pools:
            pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
            await pool.open(wait=True, timeout=30)
            _pools[url] = pool
    return _pools[url]


@app.handler(ChaosJob)
async def handle(job: ChaosJob, ctx: JobContext) -> None:
    await asyncio.sleep(job.work_ms / 1000)
    pool = await _effects()
    async with pool.connection(timeout=10) as conn:
        await conn.execute(
            f"INSERT INTO {TABLE} (run, job_id, seq, key, pid, attempt) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (
                os.environ["JOBSTREAM_CHAOS_RUN"],
                ctx.job_id,
                job.seq,
                ctx.key or "",
                os.getpid(),
                ctx.attempt,
            ),
        )
