"""PostgreSQL idempotency store: one row per job key in `<namespace>_idempotency`.

A claim is a single `INSERT ... ON CONFLICT DO UPDATE ... WHERE` that only takes a row
that is gone (`expires_at` passed: `HOLD_LEASES` leases after a running claim's last
write, `retention_s` after a completion) or is this token's own, so two deliveries can
never both hold a claim. The stamp `holder` returns is the token and `expires_at` (in
microseconds), which every renewal moves; `take_over` is an `UPDATE` conditional on it.
Expired rows are deleted now and then (the retention bound). Claims and completions made
in one turn of the event loop go to the server together, in pipeline mode
(`_batching.MicroBatch`): one round trip for the batch, each statement its own transaction.

Transactional completion (docs/outbox.md): `transaction()` lends a pooled connection for a
handler's transaction, and `complete_in` writes the completion inside it, fenced: an
`UPDATE` that matches only this delivery's running claim (its token), so a delivery whose
claim was taken over completes nothing, and the row it locks makes a takeover wait for the
commit (then it finds the job done).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from consumer.core import DeadLetter
from consumer.stores._batching import MicroBatch
from consumer.stores._idempotency import HOLD_LEASES, ClaimState

_CLEANUP_EVERY = 1000


class PostgresIdempotencyStore:
    def __init__(self, pool: AsyncConnectionPool, table: str) -> None:
        self._pool = pool
        self._table = sql.Identifier(table)
        self._completed = 0
        self._claims: MicroBatch[tuple[str, str, float], ClaimState] = MicroBatch(self._claim_batch)
        self._completions: MicroBatch[tuple[str, str, float], None] = MicroBatch(
            self._complete_batch
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one handler transaction (the caller runs `BEGIN` through
        `connection.transaction()`); `psycopg_pool.PoolTimeout` when none is free in time."""
        async with self._pool.connection() as conn:
            yield conn

    async def complete_in(
        self, conn: psycopg.AsyncConnection[Any], key: str, token: str, retention_s: float
    ) -> bool:
        """Record `key` completed inside `conn`'s open transaction, only if `token` still
        holds its running claim; False (nothing written) when it does not. `DeadLetter`
        when the handler ended the transaction itself (a COMMIT or ROLLBACK sent through
        `ctx.transaction`): the completion would commit on its own, apart from the effect."""
        if conn.info.transaction_status is TransactionStatus.IDLE:
            msg = (
                "the handler ended ctx.transaction itself (a COMMIT or ROLLBACK through it): "
                "its effect and the completion can no longer commit together; do not commit, "
                "roll back or close ctx.transaction"
            )
            raise DeadLetter(msg)
        query = sql.SQL(
            "UPDATE {} SET state = 'done', expires_at = now() + make_interval(secs => %s)"
            " WHERE key = %s AND owner = %s AND state = 'running'"
        ).format(self._table)
        return (await conn.execute(query, (retention_s, key, token))).rowcount == 1

    @classmethod
    async def connect(
        cls, url: str, namespace: str, *, max_connections: int = 8
    ) -> PostgresIdempotencyStore:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", namespace):
            msg = f"idempotency namespace {namespace!r} must be a plain SQL identifier"
            raise ValueError(msg)
        table = sql.Identifier(f"{namespace}_idempotency")
        # One plain connection first: a server that is away fails here at once, with its
        # reason (the pool would retry in the background and report only its timeout).
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=5
        ) as conn:
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, state text NOT NULL,"
                    " owner text NOT NULL, expires_at timestamptz NOT NULL)"
                ).format(table)
            )
        pool = AsyncConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True, timeout=10)
        return cls(pool, f"{namespace}_idempotency")

    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
        return await self._claims((key, token, lease_s))

    async def _claim_batch(self, claims: Sequence[tuple[str, str, float]]) -> list[ClaimState]:
        query = sql.SQL(
            "INSERT INTO {t} AS t (key, state, owner, expires_at)"
            " VALUES (%s, 'running', %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (key) DO UPDATE SET state = 'running', owner = EXCLUDED.owner,"
            " expires_at = EXCLUDED.expires_at"
            " WHERE t.expires_at < now() OR (t.state = 'running' AND t.owner = EXCLUDED.owner)"
            " RETURNING state"
        ).format(t=self._table)
        async with self._pool.connection() as conn:
            async with conn.pipeline():
                cursors = [
                    await conn.execute(query, (key, token, HOLD_LEASES * lease_s))
                    for key, token, lease_s in claims
                ]
            claimed = [await cursor.fetchone() is not None for cursor in cursors]
            others = [key for (key, _, _), won in zip(claims, claimed, strict=True) if not won]
            done: set[str] = set()
            if others:
                rows = await (
                    await conn.execute(
                        sql.SQL("SELECT key FROM {} WHERE key = ANY(%s) AND state = 'done'").format(
                            self._table
                        ),
                        (others,),
                    )
                ).fetchall()
                done = {row[0] for row in rows}
        return [
            ClaimState.CLAIMED if won else ClaimState.COMPLETED if key in done else ClaimState.BUSY
            for (key, _, _), won in zip(claims, claimed, strict=True)
        ]

    async def holder(self, key: str) -> str | None:
        query = sql.SQL(
            "SELECT owner, (extract(epoch from expires_at) * 1000000)::bigint FROM {}"
            " WHERE key = %s AND state = 'running'"
            " AND expires_at >= now()"
        ).format(self._table)
        async with self._pool.connection() as conn:
            row = await (await conn.execute(query, (key,))).fetchone()
        return None if row is None else f"{row[0]}#{row[1]}"

    async def take_over(self, key: str, holder: str, token: str, lease_s: float) -> bool:
        owner, _, micros = holder.rpartition("#")
        query = sql.SQL(
            "UPDATE {} SET owner = %s, expires_at = now() + make_interval(secs => %s)"
            " WHERE key = %s AND state = 'running' AND owner = %s"
            " AND (extract(epoch from expires_at) * 1000000)::bigint = %s"
        ).format(self._table)
        args = (token, HOLD_LEASES * lease_s, key, owner, int(micros))
        async with self._pool.connection() as conn:
            return (await conn.execute(query, args)).rowcount == 1

    async def renew(self, key: str, token: str, lease_s: float) -> bool:
        query = sql.SQL(
            "UPDATE {} SET expires_at = now() + make_interval(secs => %s)"
            " WHERE key = %s AND owner = %s AND state = 'running' AND expires_at >= now()"
        ).format(self._table)
        async with self._pool.connection() as conn:
            return (await conn.execute(query, (HOLD_LEASES * lease_s, key, token))).rowcount == 1

    async def complete(self, key: str, token: str, retention_s: float) -> None:
        await self._completions((key, token, retention_s))

    async def _complete_batch(self, completions: Sequence[tuple[str, str, float]]) -> list[None]:
        query = sql.SQL(
            "INSERT INTO {t} AS t (key, state, owner, expires_at)"
            " VALUES (%s, 'done', %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (key) DO UPDATE SET state = 'done', owner = EXCLUDED.owner,"
            " expires_at = EXCLUDED.expires_at"
        ).format(t=self._table)
        async with self._pool.connection() as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(query, completions)  # one pipeline
            cleanup = self._completed // _CLEANUP_EVERY
            self._completed += len(completions)
            if self._completed // _CLEANUP_EVERY > cleanup:
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE expires_at < now()").format(self._table)
                )
        return [None] * len(completions)

    async def release(self, key: str, token: str) -> None:
        query = sql.SQL("DELETE FROM {} WHERE key = %s AND owner = %s AND state = 'running'")
        async with self._pool.connection() as conn:
            await conn.execute(query.format(self._table), (key, token))

    async def close(self) -> None:
        await self._claims.close()
        await self._completions.close()
        await self._pool.close()
