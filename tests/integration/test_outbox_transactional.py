"""Transactional completion and the outbox against a real PostgreSQL, with the in-memory
broker (issue 18; the SIGKILL runs on Kafka and NATS are tests/integration/test_outbox_chaos.py).

Effects are rows written through `ctx.transaction` (`tests.apps.outbox`), counted by job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumer import App, JobContext, WorkerError
from consumer.core import Outcome, Settings
from consumer.memory import TestApp
from examples.orders import main as orders_example
from producer.memory import MemoryPublisher
from producer.outbox import Outbox, OutboxRelay, RelayOptions
from producer.retrying import Backoff
from schemas import Job
from tests.apps import outbox as outbox_app
from tests.apps.outbox import OutboxEffect, effects_ddl
from tests.conftest import POSTGRES_DSN
from tests.support import ROOT, wait_until

FAST_BACKOFF = Backoff(initial_s=0.05, max_s=0.2)


class Bulky(Job, type="test.bulky", version=1):
    blob: str


pytestmark = pytest.mark.integration


@pytest.fixture
async def names() -> AsyncIterator[dict[str, str]]:
    """A namespace, an effects table and an outbox table of this test's own, dropped after."""
    suffix = uuid.uuid4().hex[:8]
    found = {"namespace": f"tx_{suffix}", "effects": f"fx_{suffix}", "outbox": f"ob_{suffix}"}
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await conn.execute(effects_ddl(found["effects"]))
        yield found
        for table in (f"{found['namespace']}_idempotency", found["effects"], found["outbox"]):
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def settings(names: dict[str, str], **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "transport": "memory",
        "worker": {"commit_interval_s": 0.02, "max_in_flight": 8},
        "idempotency": {
            "backend": "postgres",
            "url": POSTGRES_DSN,
            "namespace": names["namespace"],
        },
        "retry": {
            "policy": {"max_attempts": 3, "initial_delay_s": 0.05, "multiplier": 2, "jitter": 0},
            "tiers_s": [0.05, 0.2],
        },
        **changes,
    }
    return Settings.model_validate(values)


async def effects(table: str) -> list[tuple[str, int, str, int]]:
    """(job id, seq, key, attempt) of every committed effect, in the order written."""
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        cursor = await conn.execute(
            sql.SQL("SELECT job_id, seq, key, attempt FROM {} ORDER BY at").format(
                sql.Identifier(table)
            )
        )
        return [(str(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in await cursor.fetchall()]


async def test_each_effect_lands_once_and_a_failed_attempts_effect_is_rolled_back(
    names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_OUTBOX_EFFECTS", names["effects"])
    jobs = [OutboxEffect(seq=n, work_ms=1, fail_first=n % 4 == 0) for n in range(40)]
    async with TestApp(outbox_app.app, settings(names), workers=2) as t:
        receipts = await t.publish_many(jobs)
        await t.drain(timeout_s=30)
        ids = [r.job_id for r in receipts]
        # The same jobs again: each finds its completion, committed with its effect.
        again = [
            await t.publish(job, id=job_id) for job, job_id in zip(jobs[:5], ids[:5], strict=True)
        ]
        await t.drain(timeout_s=30)
        assert [t.settlements(r.job_id)[-1].outcome for r in again] == [Outcome.DUPLICATE] * 5
    rows = await effects(names["effects"])
    assert sorted(r[0] for r in rows) == sorted(ids), "one effect per job, none twice"
    attempts = {r[1]: r[3] for r in rows}
    assert all(attempts[n] == (2 if n % 4 == 0 else 1) for n in range(40)), attempts


async def test_a_claim_taken_over_mid_transaction_commits_nothing_and_settles_nothing(
    names: dict[str, str],
) -> None:
    app = App("takeover")
    written, go_on = asyncio.Event(), asyncio.Event()

    @app.handler(OutboxEffect, transactional=True)
    async def handle(job: OutboxEffect, ctx: JobContext) -> None:
        await ctx.transaction.execute(
            sql.SQL(
                "INSERT INTO {} (job_id, seq, key, pid, attempt) VALUES (%s, %s, '', 0, 1)"
            ).format(sql.Identifier(names["effects"])),
            (ctx.job_id, job.seq),
        )
        written.set()
        await go_on.wait()

    async with TestApp(app, settings(names)) as t:
        receipt = await t.publish(OutboxEffect(seq=1))
        async with asyncio.timeout(10):
            await written.wait()
        # Another delivery takes the claim over while the effect waits uncommitted.
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            taken = await conn.execute(
                sql.SQL("UPDATE {} SET owner = 'intruder' WHERE key = %s").format(
                    sql.Identifier(f"{names['namespace']}_idempotency")
                ),
                (receipt.job_id,),
            )
            assert taken.rowcount == 1
        go_on.set()
        await wait_until(lambda: t.workers[0].in_flight == 0, 10, "the run ended")
        assert t.settlements(receipt.job_id) == [], "a run whose fence failed is never settled"
    assert await effects(names["effects"]) == [], "its effect was rolled back"


async def test_a_run_timed_out_whose_handler_swallowed_it_rolls_back(
    names: dict[str, str],
) -> None:
    app = App("swallow")

    @app.handler(OutboxEffect, transactional=True, timeout_s=0.3)
    async def handle(job: OutboxEffect, ctx: JobContext) -> None:
        await ctx.transaction.execute(
            sql.SQL(
                "INSERT INTO {} (job_id, seq, key, pid, attempt) VALUES (%s, %s, '', 0, %s)"
            ).format(sql.Identifier(names["effects"])),
            (ctx.job_id, job.seq, ctx.attempt),
        )
        if ctx.attempt == 1:
            with contextlib.suppress(
                asyncio.CancelledError
            ):  # swallowed: returns as if it finished
                await asyncio.sleep(5)

    async with TestApp(app, settings(names)) as t:
        receipt = await t.publish(OutboxEffect(seq=7))
        await t.drain(timeout_s=30)
        assert [s.outcome for s in t.settlements(receipt.job_id)] == [
            Outcome.RETRYING,
            Outcome.COMPLETED,
        ]
    assert [(r[0], r[3]) for r in await effects(names["effects"])] == [(receipt.job_id, 2)]


async def test_a_transactional_handler_needs_the_postgres_store(names: dict[str, str]) -> None:
    memory = settings(names, idempotency={"backend": "memory"})
    with pytest.raises(WorkerError, match="need the postgres idempotency store, not 'memory'"):
        async with TestApp(outbox_app.app, memory):
            pass


async def test_the_outbox_publishes_committed_jobs_once_in_key_order_and_rolled_back_never(
    names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_OUTBOX_EFFECTS", names["effects"])
    worker_settings = settings(names)
    outbox = Outbox(worker_settings, table=names["outbox"])
    committed: list[str] = []
    rolled_back: list[str] = []
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        for n in range(200):
            ids: list[str] = []
            try:
                async with conn.transaction():
                    for part in range(2):
                        seq = 2 * n + part
                        ids.append(
                            await outbox.add(
                                conn, OutboxEffect(seq=seq, work_ms=1), key=f"k{n % 7}"
                            )
                        )
                    if n % 10 == 3:
                        raise psycopg.Rollback
            finally:
                (rolled_back if n % 10 == 3 else committed).extend(ids)
    async with TestApp(outbox_app.app, worker_settings, workers=2) as t:
        await t.producer.ensure(["outbox.effect"])
        # Two relay replicas at once: one publishes, the other stands by.
        relays = [
            OutboxRelay(
                POSTGRES_DSN,
                MemoryPublisher(t.broker, partitions=worker_settings.routing.partitions),
                RelayOptions(table=names["outbox"], poll_s=0.05, standby_poll_s=0.05),
            )
            for _ in range(2)
        ]
        stop = asyncio.Event()
        running = [asyncio.create_task(relay.run(stop)) for relay in relays]
        await wait_until(
            lambda: sum(r.published for r in relays) >= len(committed), 30, "every row published"
        )
        await t.drain(timeout_s=30)
        stop.set()
        await asyncio.gather(*running)
        assert sorted(r.published for r in relays) == [0, len(committed)], "one replica published"
        assert all(len(t.settlements(job_id)) == 1 for job_id in committed), "each sent once"
    rows = await effects(names["effects"])
    assert sorted(r[0] for r in rows) == sorted(committed)
    assert not {r[0] for r in rows} & set(rolled_back)
    by_key: dict[str, list[int]] = {}
    for _, seq, key, _ in rows:
        by_key.setdefault(key, []).append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_key.values()), by_key


async def test_sent_rows_are_pruned_after_the_retention(names: dict[str, str]) -> None:
    outbox = Outbox(settings(names), table=names["outbox"])
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        async with conn.transaction():
            for n in range(30):
                await outbox.add(conn, OutboxEffect(seq=n))
        publisher = MemoryPublisher(partitions=1)
        await publisher.ensure(["jobs.outbox.effect"])
        relay = OutboxRelay(
            POSTGRES_DSN,
            publisher,
            RelayOptions(table=names["outbox"], batch_size=10, retention_s=0, prune_every_s=0),
        )
        assert [await relay.relay_round(conn) for _ in range(4)] == [10, 10, 10, 0]
        assert await relay.prune(conn) == 30
        count = await (
            await conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(names["outbox"]))
            )
        ).fetchone()
        assert count == (0,)


async def test_the_orders_example_confirms_every_placed_order_once() -> None:
    counts = await orders_example(POSTGRES_DSN, orders=20)
    # Every fifth order was rolled back: 16 orders, 16 jobs published, 16 confirmations.
    assert counts == {"orders": 16, "confirmations": 16, "published": 16}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    clean.update({"PYTHONPATH": str(ROOT), "JOBSTREAM_HEALTH__PORT": "0", **env})
    command = [sys.executable, "-m", "jobstream", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=clean, timeout=60, check=False, cwd=ROOT
    )


def test_bad_setups_stop_with_one_line() -> None:
    worker = cli(
        "worker",
        "tests.apps.outbox:app",
        JOBSTREAM_IDEMPOTENCY__BACKEND="redis",
        JOBSTREAM_IDEMPOTENCY__URL="redis://127.0.0.1:6379/0",
    )
    assert worker.returncode == 1, worker.stderr
    last = worker.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: transactional handlers (tests.apps.outbox.handle) need the "
        "postgres idempotency store, not 'redis'"
    ), worker.stderr
    relay = cli("outbox", "relay")
    assert relay.returncode == 2
    assert relay.stderr.strip().splitlines() == [
        "error: JOBSTREAM_OUTBOX__URL is not set: point it at the PostgreSQL database that "
        "holds the outbox table, e.g. postgresql://app@db:5432/app"
    ]
    away = cli("outbox", "relay", JOBSTREAM_OUTBOX__URL="postgresql://nobody@127.0.0.1:1/none")
    assert away.returncode == 1
    assert (
        away.stderr.strip().splitlines()[-1].startswith("error: cannot reach the outbox database")
    )


async def test_a_connection_killed_mid_transaction_lands_nothing_and_the_retry_lands_once(
    names: dict[str, str],
) -> None:
    app = App("terminated")
    backends: list[int] = []
    terminated = asyncio.Event()

    @app.handler(OutboxEffect, transactional=True)
    async def handle(job: OutboxEffect, ctx: JobContext) -> None:
        await ctx.transaction.execute(
            sql.SQL(
                "INSERT INTO {} (job_id, seq, key, pid, attempt) VALUES (%s, %s, '', 0, %s)"
            ).format(sql.Identifier(names["effects"])),
            (ctx.job_id, job.seq, ctx.attempt),
        )
        if ctx.attempt == 1:
            row = await (await ctx.transaction.execute("SELECT pg_backend_pid()")).fetchone()
            assert row is not None
            backends.append(int(row[0]))
            await terminated.wait()  # the server ends this session under the transaction

    async with TestApp(app, settings(names)) as t:
        receipt = await t.publish(OutboxEffect(seq=3))
        await wait_until(lambda: bool(backends), 10, "the first attempt in its transaction")
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", (backends[0],))
        terminated.set()
        await t.drain(timeout_s=30)
        outcomes = [s.outcome for s in t.settlements(receipt.job_id)]
        assert outcomes == [Outcome.RETRYING, Outcome.COMPLETED]
    assert [(r[0], r[3]) for r in await effects(names["effects"])] == [(receipt.job_id, 2)]


async def test_the_relay_waits_out_a_broker_outage_and_sets_aside_a_row_it_can_never_send(
    names: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(settings(names), table=names["outbox"])
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        async with conn.transaction():
            small = [await outbox.add(conn, OutboxEffect(seq=n), key="k") for n in range(5)]
            huge = await outbox.add(conn, Bulky(blob="x" * 10_000), key="other")
    publisher = MemoryPublisher(partitions=1)
    await publisher.ensure(["jobs.outbox.effect", "jobs.test.bulky"])
    broker = publisher.broker
    broker.faults.disconnect()
    relay = OutboxRelay(
        POSTGRES_DSN,
        publisher,
        RelayOptions(table=names["outbox"], poll_s=0.05, backoff=FAST_BACKOFF),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    await wait_until(lambda: "the broker did not take the rows" in caplog.text, 10, "a retry")
    assert relay.published == 0
    broker.faults.limit_record_bytes(5_000)  # the broker can never take the 10 kB one
    broker.faults.reconnect()
    await wait_until(lambda: relay.published == 5 and relay.set_aside == 1, 10, "all rows")
    stop.set()
    await running
    assert "can never be published" in caplog.text and huge in caplog.text
    records = broker.read("jobs.outbox.effect", 0, 0)
    ids = [dict(r.headers)["ce_id"].decode() for r in records]
    # The wave the broker refused for good went again row by row: a row it had taken from
    # that wave may be there twice, under its one job id (the workers skip the copy).
    assert list(dict.fromkeys(ids)) == small, "in insert order, after the outage"
    assert len(ids) <= len(small) + 1
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        row = await (
            await conn.execute(
                sql.SQL("SELECT error FROM {} WHERE job_id = %s").format(
                    sql.Identifier(names["outbox"])
                ),
                (huge,),
            )
        ).fetchone()
    assert row is not None and str(row[0]).startswith("RecordTooLarge")


async def test_outbox_status_counts_waiting_set_aside_and_sent(names: dict[str, str]) -> None:
    outbox = Outbox(settings(names), table=names["outbox"])
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await outbox.ensure_table(conn)
        async with conn.transaction():
            for n in range(6):
                await outbox.add(conn, OutboxEffect(seq=n))
        table = sql.Identifier(names["outbox"])
        await conn.execute(
            sql.SQL("UPDATE {} SET sent_at = now() WHERE id IN (SELECT min(id) FROM {})").format(
                table, table
            )
        )
        await conn.execute(
            sql.SQL("UPDATE {} SET error = 'refused' WHERE id = (SELECT max(id) FROM {})").format(
                table, table
            )
        )
    env = {"JOBSTREAM_OUTBOX__URL": POSTGRES_DSN, "JOBSTREAM_OUTBOX__TABLE": names["outbox"]}
    found = await asyncio.to_thread(cli, "outbox", "status", "--json", **env)
    assert found.returncode == 0, found.stderr
    status = json.loads(found.stdout)
    assert (status["waiting"], status["set_aside"], status["sent"]) == (4, 1, 1)
    assert status["oldest_waiting_s"] >= 0
