"""The transactional outbox: add jobs inside the caller's own PostgreSQL transaction.

    outbox = Outbox(settings)                      # table `jobstream_outbox` by default
    async with conn.transaction():                 # the caller's psycopg 3 connection
        await conn.execute("INSERT INTO orders ...")
        job_id = await outbox.add(conn, SendConfirmation(order_id=42), key="order-42")

Guarantees (docs/outbox.md):

- The job is a row of the caller's transaction: it is published (by the relay,
  `producer._outbox_relay`) if and only if that transaction commits. A rolled-back
  transaction publishes nothing.
- Everything on the wire is fixed at insert: the job id, the CloudEvents headers (binary
  mode, the Kafka binding's `ce_` names, as `to_kafka` writes them), the record key, the
  destination and the trace context (`traceparent`: a PRODUCER span `create
  <destination>` when an SDK records, else the caller's context; the caller's context is
  the job's origin). A row published again after a relay crash is the same job, byte for
  byte in its id, so the worker's idempotency store skips it.
- `add` refuses (`ValueError`) an autocommit connection with no transaction open: the job
  would commit on its own, not with the caller's writes.
- `add` validates as `JobProducer.publish` does (`ValueError` for a bad delay or a
  priority the routing does not allow, `InvalidAttributes` for oversized headers) before
  anything is written.

The table is created by `ensure_table` (idempotent; `jobstream outbox relay` calls it). Its
name is a plain SQL identifier (`ValueError` otherwise).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, TracerProvider
from psycopg import AsyncConnection, Connection, sql
from psycopg.pq import TransactionStatus

from producer import tracecontext as otel
from producer._request import PublishRequest, encode_request
from producer._settings import Priority, ProducerSettings
from producer.tracecontext import TraceHeaders, current_trace_headers, traceparent_of
from schemas import Job, to_kafka

__all__ = ["DEFAULT_TABLE", "Outbox", "OutboxRow", "outbox_ddl"]

DEFAULT_TABLE = "jobstream_outbox"

OutboxRow = tuple[str, str, str | None, str, bytes]
"""(job id, destination, record key, headers as JSON `[[name, value], ...]`, body)."""


def outbox_ddl(table: str) -> list[sql.Composed]:
    """The statements that create `table` and its index of unsent rows (idempotent)."""
    name = sql.Identifier(_checked(table))
    unsent = sql.Identifier(f"{table}_unsent")
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY, job_id text NOT NULL,"
            " destination text NOT NULL, record_key text, headers jsonb NOT NULL,"
            " body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),"
            " sent_at timestamptz, error text)"
        ).format(name),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} (id) WHERE sent_at IS NULL AND error IS NULL"
        ).format(unsent, name),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (sent_at) WHERE sent_at IS NOT NULL").format(
            sql.Identifier(f"{table}_sent"), name
        ),
    ]


class Outbox:
    """Writes jobs into the outbox table through the caller's connection, in the caller's
    transaction. Holds no connection of its own; safe to share."""

    def __init__(
        self,
        settings: ProducerSettings | None = None,
        *,
        table: str = DEFAULT_TABLE,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        """`settings` name the transport (for the destination) and the CloudEvents
        `source`; `table` the outbox table (`ValueError` unless a plain SQL identifier)."""
        self._settings = settings if settings is not None else ProducerSettings()
        self._table = _checked(table)
        self._insert = sql.SQL(
            "INSERT INTO {} (job_id, destination, record_key, headers, body)"
            " VALUES (%s, %s, %s, %s, %s)"
        ).format(sql.Identifier(self._table))
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._provider = provider
        self._tracer = provider.get_tracer("jobstream.outbox")

    @property
    def table(self) -> str:
        return self._table

    async def ensure_table(self, conn: AsyncConnection[Any]) -> None:
        """Create the table and its indexes if missing (in `conn`'s current transaction)."""
        for statement in outbox_ddl(self._table):
            await conn.execute(statement)

    async def add(
        self,
        conn: AsyncConnection[Any],
        job: Job,
        *,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        subject: str | None = None,
        delay: float | timedelta | None = None,
        priority: Priority = "normal",
    ) -> str:
        """Insert `job` into the outbox in `conn`'s transaction; returns its job id. The
        options are `JobProducer.publish`'s (no unique keys: the transaction is the
        uniqueness). Committed, the job is published by the relay; rolled back, never.
        `ValueError` (nothing written) for an autocommit connection outside a transaction
        block: the row would commit on its own, apart from the caller's writes."""
        _in_transaction(conn)
        row = self.row(job, key, id, idempotency_key, not_before, subject, delay, priority)
        await conn.execute(self._insert, row)
        return row[0]

    def add_sync(
        self,
        conn: Connection[Any],
        job: Job,
        *,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        subject: str | None = None,
        delay: float | timedelta | None = None,
        priority: Priority = "normal",
    ) -> str:
        """`add` for a synchronous psycopg `Connection` (same row, same guarantees)."""
        _in_transaction(conn)
        row = self.row(job, key, id, idempotency_key, not_before, subject, delay, priority)
        conn.execute(self._insert, row)
        return row[0]

    def row(
        self,
        job: Job,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        subject: str | None = None,
        delay: float | timedelta | None = None,
        priority: Priority = "normal",
    ) -> OutboxRow:
        """The outbox row for `job`: everything the relay publishes, fixed now (for callers
        that write it with their own database client)."""
        request = PublishRequest(job, key, id, idempotency_key, not_before, subject, delay)
        job_type = getattr(type(job), "job_type", None)
        if job_type is None:
            msg = f"{type(job).__qualname__} has no job type; declare it with type= and version="
            raise TypeError(msg)
        destination = self._settings.routing.destination(
            self._settings.transport, str(job_type), priority
        )
        origin = current_trace_headers()
        if not otel.recording_provider(self._provider):
            return self._encode(request, destination, origin, origin)
        span = self._tracer.start_span(
            f"create {destination}",
            kind=SpanKind.PRODUCER,
            attributes={
                otel.SYSTEM: self._settings.transport,
                otel.OPERATION_NAME: "create",
                otel.OPERATION_TYPE: "create",
                otel.DESTINATION: destination,
            },
        )
        try:
            row = self._encode(
                request, destination, traceparent_of(span.get_span_context()), origin
            )
            span.set_attribute(otel.JOB_ID, row[0])
            span.set_attribute(otel.MESSAGE_ID, row[0])
        finally:
            span.end()
        return row

    def _encode(
        self, request: PublishRequest, destination: str, trace: TraceHeaders, origin: TraceHeaders
    ) -> OutboxRow:
        if origin[0] is None:
            origin = trace
        message = encode_request(request, self._settings.source, trace, origin)
        _, headers = to_kafka(message.attributes)  # raises InvalidAttributes when oversized
        text = json.dumps([[name, value.decode()] for name, value in headers])
        return message.attributes.id, destination, request.key, text, message.body


def _in_transaction(conn: AsyncConnection[Any] | Connection[Any]) -> None:
    """Refuse a connection on which the insert would commit on its own (autocommit, no
    transaction open). Without autocommit psycopg opens one (the caller commits it)."""
    if conn.autocommit and conn.info.transaction_status is TransactionStatus.IDLE:
        msg = (
            "Outbox.add must run inside a transaction: the connection is in autocommit mode "
            "with none open, so the job would commit on its own; wrap it and the writes it "
            "belongs with in `conn.transaction()`"
        )
        raise ValueError(msg)


def _checked(table: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,50}", table):
        msg = f"outbox table {table!r} must be a plain SQL identifier (letters, digits, _)"
        raise ValueError(msg)
    return table
