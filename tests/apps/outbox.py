"""The outbox runs' app (`tests/chaos_outbox.py`, `tests/integration/test_outbox*.py`): a
transactional handler whose effect is one row in `<JOBSTREAM_OUTBOX_EFFECTS>`, written
through `ctx.transaction`, so it commits with the job's completion record or not at all.

`work_ms` is spent inside the transaction, after the effect is written: a SIGKILL then
lands between the effect and the commit, the window a non-transactional handler cannot
close. A job with `fail_first` raises on its first attempt after writing its effect (the
rollback must discard it). With `JOBSTREAM_OUTBOX_STARTS` (a directory), every run also
appends its job id to `<dir>/<pid>` first, unbuffered, so a run cut short by a SIGKILL is
still counted: the chaos run reports how many kills landed inside a transaction.
"""

from __future__ import annotations

import asyncio
import os

from psycopg import sql

from consumer import App, JobContext
from schemas import Job


class OutboxEffect(Job, type="outbox.effect", version=1):
    seq: int
    work_ms: int = 20
    fail_first: bool = False


app = App("outbox")


def effects_table() -> str:
    return os.environ.get("JOBSTREAM_OUTBOX_EFFECTS", "outbox_effects")


def effects_ddl(table: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (job_id text NOT NULL, seq integer NOT NULL,"
        " key text NOT NULL, pid integer NOT NULL, attempt integer NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ).format(sql.Identifier(table))


_starts: list[int] = []  # this process's file of started runs, opened by the first job


def _note_start(job_id: str) -> None:
    folder = os.environ.get("JOBSTREAM_OUTBOX_STARTS")
    if not folder:
        return
    if not _starts:
        path = os.path.join(folder, str(os.getpid()))
        _starts.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    os.write(_starts[0], f"{job_id}\n".encode())


@app.handler(OutboxEffect, transactional=True)
async def handle(job: OutboxEffect, ctx: JobContext) -> None:
    _note_start(ctx.job_id)
    await ctx.transaction.execute(
        sql.SQL(
            "INSERT INTO {} (job_id, seq, key, pid, attempt) VALUES (%s, %s, %s, %s, %s)"
        ).format(sql.Identifier(effects_table())),
        (ctx.job_id, job.seq, ctx.key or "", os.getpid(), ctx.attempt),
    )
    await asyncio.sleep(job.work_ms / 1000)
    if job.fail_first and ctx.attempt == 1:
        msg = "first attempt fails after its effect was written"
        raise RuntimeError(msg)
