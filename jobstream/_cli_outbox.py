"""`jobstream outbox relay|status`: publish the transactional outbox, and see what it holds.

`relay` runs until SIGTERM/SIGINT: it creates the outbox table if missing (an existing
one needs only SELECT, UPDATE and DELETE), then publishes committed rows in insert order
per key with the configured transport (one replica at a time: the others stand by;
`producer/_outbox_relay.py`). `/livez` (with `outbox.health_port`) answers 503 when no
round ended for `outbox.liveness_silence_s`; `/readyz` 503 until the broker and the
database answered once. `status` prints the rows waiting, set aside and sent (kept for
`outbox.retention_s`), and the oldest waiting row's age. Without `outbox.url` both exit
2 with one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from typing import Annotated, Any, Literal

import psycopg
import typer
from psycopg import sql

from consumer.runtime import HealthServer
from jobstream._config import USAGE, OutboxRelaySettings, fail, load_settings, run
from producer import JobProducer
from producer.outbox import OutboxRelay, RelayOptions, outbox_ddl
from producer.secrets import with_password

log = logging.getLogger("jobstream.outbox")


def register(app: typer.Typer) -> None:
    outbox = typer.Typer(help="The transactional outbox (PostgreSQL) and its relay.")
    app.add_typer(outbox, name="outbox")

    @outbox.command(
        "relay",
        help="Publish committed outbox rows to the broker until SIGTERM (one replica "
        "publishes, others stand by).",
    )
    def relay(
        transport: Annotated[
            Literal["kafka", "nats"] | None,
            typer.Option(help="Broker to publish to \\[env: JOBSTREAM_TRANSPORT]."),
        ] = None,
        health_port: Annotated[
            int | None,
            typer.Option(
                help="Port of /livez and /readyz, 0 = off \\[env: JOBSTREAM_OUTBOX__HEALTH_PORT]."
            ),
        ] = None,
    ) -> None:
        settings = load_settings(
            OutboxRelaySettings, transport=transport, **{"outbox.health_port": health_port}
        )
        url = _url(settings)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        for name in ("aiokafka", "nats"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            asyncio.run(_relay(settings, url))
        except (OSError, psycopg.Error) as error:
            raise fail(f"the outbox relay stopped: {' '.join(str(error).split())}") from None

    @outbox.command("status", help="Rows waiting, set aside and sent, and the oldest's age.")
    def status(
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        settings = load_settings(OutboxRelaySettings)
        url = _url(settings)
        found = run(lambda: _status(url, settings.outbox.table))
        if as_json:
            typer.echo(json.dumps(found))
            return
        typer.echo(
            f"{settings.outbox.table}: {found['waiting']} waiting "
            f"(oldest {found['oldest_waiting_s']:.1f}s), {found['set_aside']} set aside, "
            f"{found['sent']} sent"
        )


def _url(settings: OutboxRelaySettings) -> str:
    if settings.outbox.url is None or not settings.outbox.url.get_secret_value():
        raise fail(
            "JOBSTREAM_OUTBOX__URL is not set: point it at the PostgreSQL database that "
            "holds the outbox table, e.g. postgresql://app@db:5432/app",
            USAGE,
        )
    try:
        return with_password(
            settings.outbox.url.get_secret_value(),
            settings.outbox.password_file,
            "outbox.password_file",
        )
    except ValueError as error:
        raise fail(str(error), USAGE) from None


async def _relay(settings: OutboxRelaySettings, url: str) -> None:
    section = settings.outbox
    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=5
        ) as conn:
            # Only a missing table is created: a relay role with SELECT, UPDATE and DELETE
            # on a table a migration made may not run CREATE (even with IF NOT EXISTS).
            found = await (
                await conn.execute(
                    "SELECT to_regclass(%s)", (sql.Identifier(section.table).as_string(conn),)
                )
            ).fetchone()
            if found is None or found[0] is None:
                for statement in outbox_ddl(section.table):
                    await conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as error:
        raise fail(
            f"cannot create the outbox table {section.table!r} "
            f"({' '.join(str(error).split())}): create it with a role that may "
            "(`Outbox.ensure_table`, docs/outbox.md), then grant the relay's role SELECT, "
            "UPDATE and DELETE on it"
        ) from None
    except psycopg.Error as error:
        raise fail(
            f"cannot reach the outbox database ({' '.join(str(error).split())}); check "
            "JOBSTREAM_OUTBOX__URL"
        ) from None
    options = RelayOptions(
        table=section.table,
        batch_size=section.batch_size,
        poll_s=section.poll_s,
        standby_poll_s=section.standby_poll_s,
        retention_s=section.retention_s,
        prune_every_s=section.prune_every_s,
    )
    relay = OutboxRelay(url, JobProducer(settings).publisher, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    health = None
    if section.health_port:

        def live() -> str | None:
            silent_s = time.monotonic() - relay.last_progress
            if silent_s > section.liveness_silence_s:
                return f"no relay round ended for {silent_s:.0f}s"
            return None

        def ready() -> str | None:
            if relay.last_progress <= started:
                return "the relay has not finished a round yet"
            return live()

        health = HealthServer("0.0.0.0", section.health_port, live=live, ready=ready)  # noqa: S104 - probes come from the kubelet
        await health.start()
    try:
        await relay.run(stop)
    finally:
        if health is not None:
            await health.stop()
    log.info(
        "outbox relay stopped: %d rows published, %d set aside", relay.published, relay.set_aside
    )


async def _status(url: str, table: str) -> dict[str, Any]:
    query = sql.SQL(
        "SELECT count(*) FILTER (WHERE sent_at IS NULL AND error IS NULL),"
        " count(*) FILTER (WHERE error IS NOT NULL), count(*) FILTER (WHERE sent_at IS NOT NULL),"
        " coalesce(extract(epoch FROM now() - min(created_at)"
        " FILTER (WHERE sent_at IS NULL AND error IS NULL)), 0) FROM {}"
    ).format(sql.Identifier(table))
    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=5
        ) as conn:
            row = await (await conn.execute(query)).fetchone()
    except psycopg.errors.UndefinedTable:
        raise fail(f"no outbox table {table!r} yet: `jobstream outbox relay` creates it") from None
    except psycopg.Error as error:
        raise fail(
            f"cannot read the outbox ({' '.join(str(error).split())}); check JOBSTREAM_OUTBOX__URL"
        ) from None
    assert row is not None
    return {
        "waiting": row[0],
        "set_aside": row[1],
        "sent": row[2],
        "oldest_waiting_s": float(row[3]),
    }
