"""Unique keys in PostgreSQL: one row per key in `<namespace>_unique` (psycopg 3, the
`postgres` extra).

Compare-and-set is one statement each: an `INSERT ... ON CONFLICT DO UPDATE ... WHERE` that
takes only a row whose `expires_at` passed (absent, to the caller), an `UPDATE` or `DELETE`
conditional on the value the caller read. A row past `expires_at` counts as absent; such
rows are deleted every `_PRUNE_EVERY` new records (the size bound). Created on first use
(`CREATE TABLE IF NOT EXISTS`); a server that cannot be reached raises `ConnectionError`
(`UniqueKeys` reports it as `UniqueStoreUnavailable`), and the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from producer._settings import ProducerSettings
from producer._unique import Stored

__all__ = ["PostgresUniqueStore", "make_unique_store"]

_PRUNE_EVERY = 100


class PostgresUniqueStore:
    def __init__(self, url: str, namespace: str, timeout_s: float) -> None:
        self._url = url
        self._table = sql.Identifier(f"{namespace}_unique")
        self._timeout_s = timeout_s
        self._pool: AsyncConnectionPool | None = None
        self._opening = asyncio.Lock()
        self._created = 0

    async def get(self, key: str) -> Stored | None:
        query = sql.SQL("SELECT value FROM {} WHERE key = %s AND expires_at > now()")
        async with self._connection() as conn:
            row = await (await conn.execute(query.format(self._table), (key,))).fetchone()
        return None if row is None else Stored(str(row[0]))

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        if expected is None:
            query = sql.SQL(
                "INSERT INTO {t} AS t (key, value, expires_at)"
                " VALUES (%s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value,"
                " expires_at = EXCLUDED.expires_at WHERE t.expires_at <= now()"
            ).format(t=self._table)
            args: tuple[object, ...] = (key, value, ttl_s)
        else:
            query = sql.SQL(
                "UPDATE {} SET value = %s, expires_at = now() + make_interval(secs => %s)"
                " WHERE key = %s AND value = %s AND expires_at > now()"
            ).format(self._table)
            args = (value, ttl_s, key, expected.value)
        async with self._connection() as conn:
            done = (await conn.execute(query, args)).rowcount == 1
            if done and expected is None:
                self._created += 1
                if self._created % _PRUNE_EVERY == 0:
                    prune = sql.SQL("DELETE FROM {} WHERE expires_at < now()")
                    await conn.execute(prune.format(self._table))
        return done

    async def delete(self, key: str, expected: Stored) -> bool:
        query = sql.SQL("DELETE FROM {} WHERE key = %s AND value = %s").format(self._table)
        async with self._connection() as conn:
            return (await conn.execute(query, (key, expected.value))).rowcount == 1

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        pool = self._pool or await self._open()
        try:
            async with pool.connection(timeout=self._timeout_s) as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as error:
            raise ConnectionError(f"postgresql: {error}") from error

    async def _open(self) -> AsyncConnectionPool:
        async with self._opening:
            if self._pool is not None:
                return self._pool
            create = sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value text NOT NULL,"
                " expires_at timestamptz NOT NULL)"
            ).format(self._table)
            try:
                # One plain connection first: a server that is away fails here at once,
                # with its reason (the pool would retry in the background).
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=max(1, int(self._timeout_s))
                ) as conn:
                    # Another producer created it at the same moment: `IF NOT EXISTS`
                    # does not cover the race, which fails on the table's row type
                    # (DuplicateObject) or on the catalog's unique index (UniqueViolation).
                    with contextlib.suppress(*_CREATED_MEANWHILE):
                        await conn.execute(create)
                pool = AsyncConnectionPool(
                    self._url,
                    min_size=1,
                    max_size=8,
                    open=False,
                    kwargs={"autocommit": True},
                    check=AsyncConnectionPool.check_connection,
                )
                try:
                    await pool.open(wait=True, timeout=self._timeout_s)
                except BaseException:
                    await pool.close()
                    raise
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as error:
                raise ConnectionError(f"postgresql: {error}") from error
            self._pool = pool
            return pool


_CREATED_MEANWHILE = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.DuplicateObject,
    psycopg.errors.DuplicateTable,
)


def make_unique_store(settings: ProducerSettings, url: str) -> PostgresUniqueStore:
    """The store `unique.url` names (`postgresql://` or a conninfo); connects on first use."""
    return PostgresUniqueStore(url, settings.unique.namespace, settings.unique.timeout_s)
