"""The cluster tests' app: every successful run of a job inserts one effect row; a job
published with `fail` raises on every attempt (through the retry tiers to the dead letters).

Effects go to the PostgreSQL in `JOBSTREAM_CHAOS_EFFECTS_URL` (the shared one, never
restarted by these tests), table `cluster_effects`, one row per run with the job id, the
worker's pid and the attempt, under the run name `JOBSTREAM_CHAOS_RUN`.
"""

from __future__ import annotations

import asyncio
import os

from psycopg_pool import AsyncConnectionPool

from consumer import App, JobContext
from schemas import Job

TABLE = "cluster_effects"
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


class ClusterJob(Job, type="cluster.effect", version=1):
    seq: int
    fail: bool = False


class FailedOnPurpose(Exception):
    """The job asked to fail (it must end in the dead letters, once)."""


app = App("cluster")
_pools: dict[str, AsyncConnectionPool] = {}
_opening = asyncio.Lock()


async def _effects() -> AsyncConnectionPool:
    url = os.environ["JOBSTREAM_CHAOS_EFFECTS_URL"]
    async with _opening:
        if url not in _pools:
            pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
            await pool.open(wait=True, timeout=30)
            _pools[url] = pool
    return _pools[url]


@app.handler(ClusterJob)
async def handle(job: ClusterJob, ctx: JobContext) -> None:
    if job.fail:
        raise FailedOnPurpose(f"job {job.seq} fails on every attempt")
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
