"""Effectively once with PostgreSQL, end to end: an order service and its confirmation job.

- `place_order` writes the order and adds its confirmation job to the outbox in ONE
  transaction (`producer.outbox.Outbox`): the job exists if and only if the order does.
- The relay (`jobstream outbox relay`; here an `OutboxRelay` in-process) publishes it.
- `confirm` is a transactional handler: its write (the confirmation row) commits together
  with the job's completion record, so a redelivery after a crash finds it done and skips.

    python -m examples.orders [--url postgresql://jobstream@127.0.0.1:5432/postgres]

runs it against the in-memory broker and a PostgreSQL (`make up` starts one): 20 orders
(every fifth one rolled back), the relay, two workers; then it prints what landed. With a
real broker, run `jobstream outbox relay` and `jobstream worker examples.orders:app` with
JOBSTREAM_OUTBOX__URL and JOBSTREAM_IDEMPOTENCY__BACKEND=postgres / __URL set to the
service's database (docs/outbox.md).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import psycopg
from psycopg import sql

from consumer import App, JobContext, Settings
from consumer.memory import TestApp
from producer.memory import MemoryPublisher
from producer.outbox import Outbox, OutboxRelay, RelayOptions
from schemas import Job

app = App("orders")


class ConfirmOrder(Job, type="orders.confirm", version=1):
    """Send the confirmation of an order that was placed."""

    order_id: str
    email: str


DDL = """
CREATE TABLE IF NOT EXISTS {orders} (id text PRIMARY KEY, email text NOT NULL);
CREATE TABLE IF NOT EXISTS {confirmations} (order_id text PRIMARY KEY, job_id text NOT NULL)
"""


def tables(prefix: str) -> dict[str, sql.Identifier]:
    return {
        "orders": sql.Identifier(f"{prefix}_orders"),
        "confirmations": sql.Identifier(f"{prefix}_confirmations"),
    }


async def place_order(
    conn: psycopg.AsyncConnection[Any], outbox: Outbox, prefix: str, email: str
) -> str:
    """The service's request handler: the order and its job commit together, or neither."""
    order_id = uuid.uuid4().hex[:12]
    async with conn.transaction():
        await conn.execute(
            sql.SQL("INSERT INTO {} (id, email) VALUES (%s, %s)").format(tables(prefix)["orders"]),
            (order_id, email),
        )
        await outbox.add(conn, ConfirmOrder(order_id=order_id, email=email), key=order_id)
    return order_id


@app.handler(ConfirmOrder, transactional=True)
async def confirm(job: ConfirmOrder, ctx: JobContext) -> None:
    """Record the confirmation in the job's own transaction: it lands once. (An e-mail sent
    from here would still be at-least-once: effects outside the database are.)"""
    prefix = ctx.attributes.source.rsplit("/", 1)[-1]
    await ctx.transaction.execute(
        sql.SQL("INSERT INTO {} (order_id, job_id) VALUES (%s, %s)").format(
            tables(prefix)["confirmations"]
        ),
        (job.order_id, ctx.job_id),
    )


async def main(url: str, orders: int = 20) -> dict[str, int]:
    """Place `orders` orders (every fifth rolled back), relay and run them; what landed."""
    prefix = f"example_{uuid.uuid4().hex[:8]}"
    settings = Settings.model_validate(
        {
            "transport": "memory",
            "source": f"/examples/{prefix}",
            "idempotency": {"backend": "postgres", "url": url, "namespace": prefix},
        }
    )
    outbox = Outbox(settings, table=f"{prefix}_outbox")
    names = tables(prefix)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for statement in DDL.split(";"):
            await conn.execute(sql.SQL(statement).format(**names))
        await outbox.ensure_table(conn)
        try:
            for n in range(orders):
                async with conn.transaction():
                    await place_order(conn, outbox, prefix, f"user{n}@example.com")
                    if n % 5 == 4:
                        raise psycopg.Rollback  # e.g. payment declined: no order, no job
            async with TestApp(app, settings, workers=2) as workers:
                await workers.producer.ensure([ConfirmOrder.job_type])
                relay = OutboxRelay(
                    url,
                    MemoryPublisher(workers.broker, partitions=settings.routing.partitions),
                    RelayOptions(table=f"{prefix}_outbox"),
                )
                # `jobstream outbox relay` runs rounds until SIGTERM (`relay.run`); here the
                # rows are all in, so rounds until one finds nothing are enough.
                while await relay.relay_round(conn):
                    pass
                await workers.drain(timeout_s=30)
            counts = {}
            for name, table in names.items():
                row = await (
                    await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
                ).fetchone()
                counts[name] = int(row[0]) if row else 0
            counts["published"] = relay.published
            return counts
        finally:
            for table in [*names.values(), sql.Identifier(f"{prefix}_outbox")]:
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
            await conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"{prefix}_idempotency"))
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://jobstream@127.0.0.1:5432/postgres")
    print(asyncio.run(main(parser.parse_args().url)))
