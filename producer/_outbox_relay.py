"""The outbox relay: publish committed outbox rows to the broker, in insert order per key.

    relay = OutboxRelay(url, make_publisher(settings), RelayOptions(table="jobstream_outbox"))
    await relay.run(stop)                          # `jobstream outbox relay`

Guarantees (docs/outbox.md):

- One replica publishes at a time: the one holding the table's session advisory lock
  (`pg_try_advisory_lock`, keyed by the table's OID, so same-named tables in two schemas
  are two outboxes; on the connection it reads and marks rows with). The others stand by
  and take over when that connection ends (a killed relay's lock is released with its
  session). Two replicas never publish one row at the same time.
- Rows are read in insert order (`id`), at most `batch_size` per round, and no more rows
  once their bodies passed `batch_bytes`. Within a round a
  key's rows go in waves: a key's next row is sent only after the broker's receipt for
  the previous one (rows without a key go in the first wave). Rows are marked sent only
  after their receipt, one `UPDATE` per wave.
- A row published again after a crash (published, not yet marked) carries what was fixed
  at insert: the same job id and headers. JetStream's duplicate window drops it; a
  worker's idempotency store skips it either way.
- Errors: a database error or a retriable broker error (`BrokerUnavailable`,
  `PublishTimeout`, ...) is logged in one line and retried with backoff (the lock is let go
  on a database error and taken again). A destination that is missing is an operator's
  fix (`jobstream topics ensure`): logged, retried. A row the broker can never take
  (`RecordTooLarge`, headers that no longer decode) is set aside with its reason in
  `error`, logged, and the relay goes on: it is never retried for ever. (The wave it was
  in is sent again row by row to find it: a row of that wave the broker had already
  stored goes twice, under its one job id.)
- Sent rows are deleted `retention_s` after they were sent, `prune_batch` at a time, every
  `prune_every_s` (the table's size bound).
- Every statement is bounded (`database_timeout_s`): a database that stops answering is
  a database error (one log line, a new connection), not a silent hang.
- Health from progress: `last_progress` is the `time.monotonic()` of the last round that
  ended (a publishing round, an empty one, or a standby's look at the lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from producer._errors import DestinationMissing, PublishError
from producer._outbox import DEFAULT_TABLE
from producer._publisher import Publisher
from producer.retrying import Backoff
from schemas import JobDecodeError, JobMessage, from_kafka

__all__ = ["OutboxRelay", "RelayOptions"]

log = logging.getLogger("jobstream.outbox")

_LOCK_CLASS = 0x6A6F62  # the advisory lock's first key: "job"

_Row = tuple[int, str, str, str | None, Any, bytes]  # id, job id, destination, key, headers, body


@dataclass(frozen=True, slots=True)
class RelayOptions:
    """How the relay reads, publishes and prunes (the `outbox` settings section)."""

    table: str = DEFAULT_TABLE
    """The outbox table (a plain SQL identifier)."""
    batch_size: int = 500
    """Most rows read and published per round."""
    batch_bytes: int = 4 * 1024 * 1024
    """Most body bytes read per round (the rows up to the one that passes it; a first row
    larger than this goes alone): the relay's memory bound when rows are large."""
    poll_s: float = 0.2
    """Wait after a round that found nothing (seconds)."""
    standby_poll_s: float = 1.0
    """How often a standby replica tries to take the lock (seconds)."""
    retention_s: float = 7 * 86400.0
    """Sent rows are deleted this long after they were sent (seconds)."""
    prune_every_s: float = 60.0
    """How often sent rows past `retention_s` are deleted (seconds)."""
    prune_batch: int = 10_000
    """Most rows one prune statement deletes (a bounded transaction)."""
    database_timeout_s: float = 30.0
    """Longest wait for one statement's answer (seconds): then the connection is dropped,
    the error logged, and the relay connects again (its lock is let go with it)."""
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial_s=0.2, max_s=10.0, jitter=True)
    )
    """Waits after a database or broker error."""


class OutboxRelay:
    def __init__(self, url: str, publisher: Publisher, options: RelayOptions) -> None:
        """`publisher` is started and stopped by `run`."""
        self._url = url
        self._publisher = publisher
        self._options = options
        name = sql.Identifier(options.table)
        # A round's rows: the first `batch_size` unsent ones, cut where their bodies pass
        # `batch_bytes` (the first row always goes): the relay's memory is bounded by
        # bytes, not only by rows. `octet_length` reads a stored body's size, not the body.
        self._select = sql.SQL(
            "SELECT id, job_id, destination, record_key, headers, body FROM"
            " (SELECT id, job_id, destination, record_key, headers, body,"
            " sum(octet_length(body)) OVER (ORDER BY id) - octet_length(body) AS before"
            " FROM {} WHERE sent_at IS NULL AND error IS NULL ORDER BY id LIMIT %s) AS unsent"
            " WHERE before < %s ORDER BY id"
        ).format(name)
        self._mark = sql.SQL("UPDATE {} SET sent_at = now() WHERE id = ANY(%s)").format(name)
        self._set_aside = sql.SQL("UPDATE {} SET error = %s WHERE id = %s").format(name)
        self._prune = sql.SQL(
            "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE sent_at IS NOT NULL"
            " AND sent_at < now() - make_interval(secs => %s) LIMIT %s)"
        ).format(t=name)
        # One lock per table: (a constant, the table's OID) as the two-int4 key. The OID,
        # not the name: same-named tables in two schemas of one database (a service per
        # schema, set by search_path) are two outboxes, each with a relay publishing.
        self._lock = sql.SQL("SELECT pg_try_advisory_lock({}, {}::regclass::oid::int)").format(
            sql.Literal(_LOCK_CLASS), sql.Literal(name.as_string())
        )
        self.last_progress = time.monotonic()
        """`time.monotonic()` of the last round that ended (health)."""
        self.leading = False
        """Whether this replica holds the lock and publishes."""
        self.published = 0
        """Rows published and marked sent by this relay."""
        self.set_aside = 0
        """Rows set aside (the broker can never take them)."""
        self._pruned_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set. Errors are logged and retried with backoff; only a
        cancellation ends it otherwise."""
        failures = 0
        failed_at = time.monotonic()  # the backoff restarts once a round ended after it
        publisher_started = False
        try:
            while not stop.is_set():
                try:
                    if not publisher_started:
                        await self._publisher.start()
                        publisher_started = True
                    await self._lead(stop)
                    failures = 0
                except (psycopg.Error, OSError, PublishError) as error:
                    self.leading = False
                    if self.last_progress > failed_at:  # recovered since: a new outage
                        failures = 0
                    wait_s = self._options.backoff.wait(failures)
                    failures += 1
                    log.warning(
                        "outbox relay: %s (%s); retrying in %.1fs",
                        _what(error),
                        " ".join(str(error).split()) or type(error).__name__,
                        wait_s,
                    )
                    await _wait(stop, wait_s)
                    failed_at = time.monotonic()
        finally:
            self.leading = False
            if publisher_started:
                await self._publisher.stop()

    async def _lead(self, stop: asyncio.Event) -> None:
        """Connect, take the lock (or stand by), then relay rounds while holding it."""
        async with await psycopg.AsyncConnection.connect(
            self._url,
            autocommit=True,
            connect_timeout=5,
            application_name=f"jobstream-outbox-relay:{os.getpid()}",  # who holds the lock
        ) as conn:
            while not stop.is_set():
                row = await (await self._execute(conn, self._lock)).fetchone()
                if row is not None and row[0]:
                    break
                self.last_progress = time.monotonic()
                await _wait(stop, self._options.standby_poll_s)
            else:
                return
            self.leading = True
            log.info(
                "outbox relay: publishing from %s (this replica holds its lock)",
                self._options.table,
            )
            try:
                while not stop.is_set():
                    published = await self.relay_round(conn)
                    await self._prune_when_due(conn)
                    self.last_progress = time.monotonic()
                    if published == 0:
                        await _wait(stop, self._options.poll_s)
            finally:
                self.leading = False

    async def relay_round(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Publish one batch of unsent rows in waves; returns the rows marked sent."""
        cursor = await self._execute(
            conn, self._select, (self._options.batch_size, self._options.batch_bytes)
        )
        rows: list[_Row] = await cursor.fetchall()
        if not rows:
            return 0
        sent = 0
        for wave in _waves(rows):
            sent += await self._publish(conn, wave)
        return sent

    async def _publish(self, conn: psycopg.AsyncConnection[Any], wave: list[_Row]) -> int:
        items: list[tuple[str, JobMessage]] = []
        ids: list[int] = []
        for row in wave:
            message = await self._message(conn, row)
            if message is not None:
                items.append((row[2], message))
                ids.append(row[0])
        if not items:
            return 0
        try:
            await self._publisher.send_many(items)
        except DestinationMissing:
            raise  # the operator's fix: logged and retried by `run`
        except PublishError as error:
            if error.retriable:
                raise
            return await self._one_by_one(conn, items, ids)
        await self._execute(conn, self._mark, (ids,))
        self.published += len(ids)
        return len(ids)

    async def _one_by_one(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[tuple[str, JobMessage]],
        ids: list[int],
    ) -> int:
        """A wave the broker refused for good: find the rows it can never take."""
        sent = 0
        for (destination, message), row_id in zip(items, ids, strict=True):
            try:
                await self._publisher.send(destination, message)
            except DestinationMissing:
                raise
            except PublishError as error:
                if error.retriable:
                    raise
                await self._put_aside(conn, row_id, message.attributes.id, error)
                continue
            await self._execute(conn, self._mark, ([row_id],))
            self.published += 1
            sent += 1
        return sent

    async def _message(self, conn: psycopg.AsyncConnection[Any], row: _Row) -> JobMessage | None:
        row_id, job_id, _, key, headers, body = row
        try:
            pairs = json.loads(headers) if isinstance(headers, str) else headers
            attributes = from_kafka(
                key.encode() if key is not None else None,
                [(str(name), str(value).encode()) for name, value in pairs],
            )
        except (JobDecodeError, ValueError, TypeError) as error:
            await self._put_aside(conn, row_id, job_id, error)
            return None
        return JobMessage(attributes, bytes(body))

    async def _put_aside(
        self, conn: psycopg.AsyncConnection[Any], row_id: int, job_id: str, error: Exception
    ) -> None:
        reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:1000]
        log.error(
            "outbox relay: job %s (row %d) can never be published (%s): set aside, see its "
            "`error` column",
            job_id,
            row_id,
            reason,
        )
        await self._execute(conn, self._set_aside, (reason, row_id))
        self.set_aside += 1

    async def _execute(
        self, conn: psycopg.AsyncConnection[Any], query: sql.Composed, params: Any = None
    ) -> psycopg.AsyncCursor[Any]:
        """`conn.execute`, bounded by `database_timeout_s`: a database that does not answer
        (hung, or a lock held on the table) is `psycopg.OperationalError`, logged and retried
        on a new connection like any database error (psycopg first cancels the statement,
        itself bounded)."""
        timeout_s = self._options.database_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await conn.execute(query, params)
        except TimeoutError:
            msg = f"no answer within {timeout_s:g}s"
            raise psycopg.OperationalError(msg) from None

    async def _prune_when_due(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        if now - self._pruned_at >= self._options.prune_every_s:
            self._pruned_at = now
            await self.prune(conn)

    async def prune(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Delete up to `prune_batch` rows sent more than `retention_s` ago; how many."""
        options = self._options
        cursor = await self._execute(conn, self._prune, (options.retention_s, options.prune_batch))
        if cursor.rowcount:
            log.info(
                "outbox relay: pruned %d sent rows older than %gs",
                cursor.rowcount,
                options.retention_s,
            )
        return cursor.rowcount


def _waves(rows: Sequence[_Row]) -> list[list[_Row]]:
    """Rows in waves: the n-th row of each key in wave n; rows without a key in wave 0."""
    waves: list[list[_Row]] = []
    seen: dict[str, int] = {}
    for row in rows:
        key = row[3]
        index = 0
        if key is not None:
            index = seen.get(key, 0)
            seen[key] = index + 1
        if index == len(waves):
            waves.append([])
        waves[index].append(row)
    return waves


def _what(error: BaseException) -> str:
    if isinstance(error, DestinationMissing):
        return "a destination is missing (create it: jobstream topics ensure)"
    if isinstance(error, PublishError):
        return "the broker did not take the rows"
    return "the outbox database is unavailable"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
