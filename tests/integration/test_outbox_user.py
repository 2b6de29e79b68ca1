"""The outbox and transactional handlers tried as a user would, against a real PostgreSQL
and the in-memory broker (issue 18, tester's findings): each test is a bug seen failing
before its fix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer import App, JobContext
from consumer.core import Outcome, Settings
from consumer.memory import TestApp
from producer.memory import MemoryPublisher
from producer.outbox import Outbox, OutboxRelay, RelayOptions, outbox_ddl
from producer.retrying import Backoff
from schemas import Job
from tests.apps.outbox import OutboxEffect, effects_ddl
from tests.conftest import POSTGRES_DSN
from tests.support import ROOT, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def suffix() -> AsyncIterator[str]:
    """A suffix of this test's own; schemas and tables named with it are dropped after."""
    found = uuid.uuid4().hex[:8]
    yield found
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        for schema in (f"sa_{found}", f"sb_{found}"):
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )
        for table in (f"fx_{found}", f"tx_{found}_idempotency", f"ob_{found}"):
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def memory_settings(**changes: Any) -> Settings:
    return Settings.model_validate({"transport": "memory", **changes})


async def test_relays_of_same_named_tables_in_two_schemas_both_publish(suffix: str) -> None:
    """Two services share a database, each in its own schema (search_path), both with the
    default table name: each relay publishes its own outbox. (The lock was keyed by the
    table's name alone, so one relay stood by for ever, healthy, publishing nothing.)"""
    outbox = Outbox(memory_settings())
    urls = [f"{POSTGRES_DSN}?options=-csearch_path%3D{s}_{suffix}" for s in ("sa", "sb")]
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        for schema in ("sa", "sb"):
            await conn.execute(
                sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(f"{schema}_{suffix}"))
            )
    added: list[list[str]] = []
    relays: list[OutboxRelay] = []
    for url in urls:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await outbox.ensure_table(conn)
            async with conn.transaction():
                added.append(
                    [await outbox.add(conn, OutboxEffect(seq=n), key="k") for n in range(3)]
                )
        publisher = MemoryPublisher(partitions=1)
        await publisher.ensure(["jobs.outbox.effect"])
        relays.append(OutboxRelay(url, publisher, RelayOptions(poll_s=0.05, standby_poll_s=0.05)))
    stop = asyncio.Event()
    running = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        await wait_until(
            lambda: [r.published for r in relays] == [3, 3], 10, "both outboxes published"
        )
    finally:
        stop.set()
        await asyncio.gather(*running)
    assert all(relay.leading is False for relay in relays)


async def test_add_on_an_autocommit_connection_outside_a_transaction_is_refused(
    suffix: str,
) -> None:
    """`add` on an autocommit connection with no transaction open would commit the job on
    its own, whatever the caller's later statements do: refused, nothing written."""
    outbox = Outbox(memory_settings(), table=f"ob_{suffix}")
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        with pytest.raises(ValueError, match="inside a transaction"):
            await outbox.add(conn, OutboxEffect(seq=1))
        async with conn.transaction():  # the documented way still works
            await outbox.add(conn, OutboxEffect(seq=2))
        count = await (
            await conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(f"ob_{suffix}"))
            )
        ).fetchone()
    assert count == (1,)
    with (
        psycopg.connect(POSTGRES_DSN, autocommit=True) as sync_conn,
        pytest.raises(ValueError, match="inside a transaction"),
    ):
        outbox.add_sync(sync_conn, OutboxEffect(seq=3))
    with psycopg.connect(POSTGRES_DSN) as sync_conn:  # not autocommit: psycopg's BEGIN
        outbox.add_sync(sync_conn, OutboxEffect(seq=4))
        sync_conn.rollback()


@pytest.mark.parametrize("statement", ["ROLLBACK", "COMMIT"])
async def test_a_handler_that_ends_its_transaction_itself_is_never_completed(
    suffix: str, statement: str
) -> None:
    """A handler that sends COMMIT or ROLLBACK through `ctx.transaction`: the completion
    record would be written outside its transaction (ROLLBACK: reported done, its effect
    gone; COMMIT: the effect committed before the fence). It is dead-lettered instead, with
    the reason, and no completion is recorded in the handler's name."""
    effects, namespace = f"fx_{suffix}", f"tx_{suffix}"
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await conn.execute(effects_ddl(effects))
    app = App("ends-its-transaction")

    @app.handler(OutboxEffect, transactional=True)
    async def handle(job: OutboxEffect, ctx: JobContext) -> None:
        await ctx.transaction.execute(
            sql.SQL(
                "INSERT INTO {} (job_id, seq, key, pid, attempt) VALUES (%s, %s, '', 0, %s)"
            ).format(sql.Identifier(effects)),
            (ctx.job_id, job.seq, ctx.attempt),
        )
        await ctx.transaction.execute(statement)

    settings = memory_settings(
        worker={"commit_interval_s": 0.02},
        idempotency={"backend": "postgres", "url": POSTGRES_DSN, "namespace": namespace},
        retry={"policy": {"max_attempts": 3, "initial_delay_s": 0.05, "jitter": 0}},
    )
    async with TestApp(app, settings) as t:
        receipt = await t.publish(OutboxEffect(seq=1))
        await t.drain(timeout_s=30)
        assert [s.outcome for s in t.settlements(receipt.job_id)] == [Outcome.DEAD_LETTERED]
        [letter] = t.dead_letters()
        assert letter.reason == "dead-letter-requested"
        assert "ended ctx.transaction itself" in str(letter.headers), letter.headers


def relay_process(url: str, table: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JOBSTREAM_TRANSPORT="nats",
        JOBSTREAM_OUTBOX__URL=url,
        JOBSTREAM_OUTBOX__TABLE=table,
        JOBSTREAM_OUTBOX__STANDBY_POLL_S="0.1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "jobstream", "outbox", "relay"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_relay_role_without_create_publishes_from_a_table_a_migration_made(
    suffix: str,
) -> None:
    """Least privilege: the table made by a migration (`Outbox.ensure_table`), the relay's
    role granted SELECT, UPDATE and DELETE on it and nothing else. The relay starts and
    takes the lock (its CREATE ... IF NOT EXISTS was refused before: it exited with
    "cannot reach the outbox database (permission denied for schema ...)"). Without the
    table, it says it cannot create it, and how to fix that."""
    role, schema, table = f"relayer_{suffix}", f"sa_{suffix}", f"ob_{suffix}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)
            )
        )
    host = POSTGRES_DSN.partition("@")[2]  # postgresql://jobstream@127.0.0.1:5432/postgres
    url = f"postgresql://{role}@{host}?options=-csearch_path%3D{schema}"
    try:
        missing = relay_process(url, table)
        _, stderr = missing.communicate(timeout=60)
        assert missing.returncode == 1, stderr
        assert (
            stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: cannot create the outbox table '{table}' (permission denied")
        ), stderr
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            for statement in outbox_ddl(table):
                conn.execute(statement)
            conn.execute(
                sql.SQL("GRANT SELECT, UPDATE, DELETE ON {} TO {}").format(
                    sql.Identifier(table), sql.Identifier(role)
                )
            )
        relay = relay_process(url, table)
        try:
            assert relay.stderr is not None
            lines: list[str] = []
            deadline = time.monotonic() + 30
            while not any("holds its lock" in line for line in lines):
                assert time.monotonic() < deadline and relay.poll() is None, lines
                lines.append(relay.stderr.readline())
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.communicate(timeout=30)
        assert relay.returncode == 0
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def test_the_relays_backoff_starts_again_after_it_recovered(
    suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker outage the relay recovered from does not make the next one wait the longest
    backoff from its first retry: the count of failures restarts once a round ended. (It
    was never reset while the relay ran: a blip days after an outage waited `max_s`.)"""
    outbox = Outbox(memory_settings(), table=f"ob_{suffix}")
    publisher = MemoryPublisher(partitions=1)
    await publisher.ensure(["jobs.outbox.effect"])
    relay = OutboxRelay(
        POSTGRES_DSN,
        publisher,
        RelayOptions(table=f"ob_{suffix}", poll_s=0.02, backoff=Backoff(initial_s=0.1, max_s=0.8)),
    )

    async def add_one(seq: int) -> None:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            await outbox.ensure_table(conn)
            async with conn.transaction():
                await outbox.add(conn, OutboxEffect(seq=seq))

    def waits() -> list[float]:
        return [
            float(r.getMessage().rsplit("retrying in ", 1)[1].rstrip("s"))
            for r in caplog.records
            if "the broker did not take the rows" in r.getMessage()
        ]

    await add_one(1)
    publisher.broker.faults.disconnect()
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: 0.8 in waits(), 20, "the longest backoff")
        publisher.broker.faults.reconnect()
        await wait_until(lambda: relay.published == 1, 20, "the row published")
        before = len(waits())
        publisher.broker.faults.disconnect()
        await add_one(2)
        await wait_until(lambda: len(waits()) > before, 20, "the next outage's first retry")
        assert waits()[before] == 0.1, waits()
        publisher.broker.faults.reconnect()
        await wait_until(lambda: relay.published == 2, 20, "the second row published")
    finally:
        stop.set()
        await running


async def test_a_database_that_stops_answering_is_logged_and_retried_not_waited_for(
    suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's statements are bounded: a table locked by another session (as a hung
    database, the relay's SELECT gets no answer) is a logged database error and a retry on
    a new connection; the rows go once the lock is let go. (It waited for ever, silently.)"""
    table = f"ob_{suffix}"
    outbox = Outbox(memory_settings(), table=table)
    publisher = MemoryPublisher(partitions=1)
    await publisher.ensure(["jobs.outbox.effect"])
    relay = OutboxRelay(
        POSTGRES_DSN,
        publisher,
        RelayOptions(
            table=table,
            poll_s=0.02,
            database_timeout_s=0.5,
            backoff=Backoff(initial_s=0.05, max_s=0.2),
        ),
    )
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as holder:
        await outbox.ensure_table(holder)
        async with holder.transaction():
            await outbox.add(holder, OutboxEffect(seq=1))
        stop = asyncio.Event()
        running: asyncio.Task[None] | None = None
        try:
            async with holder.transaction():
                await holder.execute(
                    sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table))
                )
                running = asyncio.create_task(relay.run(stop))
                await wait_until(
                    lambda: (
                        "the outbox database is unavailable (no answer within 0.5s)" in caplog.text
                    ),
                    30,
                    "the unanswered statement logged",
                )
                assert relay.published == 0
            await wait_until(lambda: relay.published == 1, 30, "the row published")
        finally:
            stop.set()
            if running is not None:
                await running


class Bulky(Job, type="user.bulky", version=1):
    blob: str


async def test_a_round_reads_a_bounded_number_of_body_bytes(suffix: str) -> None:
    """Large rows: a round reads rows up to `batch_bytes` of bodies, not `batch_size` rows
    whatever their size (500 rows of 1 MB were 500 MB in a relay whose Helm limit is
    192 MiB: killed, restarted, the same rows read again, the outbox stalled)."""
    table = f"ob_{suffix}"
    outbox = Outbox(memory_settings(), table=table)
    publisher = MemoryPublisher(partitions=1)
    await publisher.ensure(["jobs.user.bulky"])
    relay = OutboxRelay(POSTGRES_DSN, publisher, RelayOptions(table=table, batch_bytes=1_000_000))
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        async with conn.transaction():
            huge = await outbox.add(conn, Bulky(blob="y" * 1_500_000))
            ids = [
                await outbox.add(conn, Bulky(blob=f"{n}" + "x" * 300_000), key=f"k{n}")
                for n in range(10)
            ]
        # A body larger than the bound goes alone; 300 kB ones 4 a round (the 4th starts
        # below 1 MB).
        assert [await relay.relay_round(conn) for _ in range(5)] == [1, 4, 4, 2, 0]
    records = publisher.broker.read("jobs.user.bulky", 0, 0)
    assert [dict(r.headers)["ce_id"].decode() for r in records] == [huge, *ids]
