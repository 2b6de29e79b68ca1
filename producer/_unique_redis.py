"""Unique keys in Redis: one string per key, `<namespace>:unique:<key>`, with a PX expiry.

Compare-and-set is one Lua script (atomic on the server): it writes only if the key still
holds the value the caller read (or is still absent). Values carry a fresh holder token, so
an equal value is the same write. Connection failures and server errors raise
`ConnectionError` (`UniqueKeys` reports them as `UniqueStoreUnavailable`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

import redis.asyncio as redis
from redis.exceptions import RedisError

from producer._settings import ProducerSettings
from producer._unique import Stored

__all__ = ["RedisUniqueStore", "make_unique_store"]

# ARGV: expected value ('' = absent), new value ('' = delete), expiry in ms.
_CAS = """
local v = redis.call('GET', KEYS[1])
if v == false then v = '' end
if v ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


class RedisUniqueStore:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._prefix = f"{namespace}:unique:"
        self._cas: Any = client.register_script(_CAS)

    async def get(self, key: str) -> Stored | None:
        try:
            value = await cast("Awaitable[Any]", self._client.get(self._prefix + key))
        except RedisError as error:
            raise ConnectionError(f"redis: {error}") from error
        return None if value is None else Stored(value)

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        old = "" if expected is None else expected.value
        return await self._swap(key, old, value, ttl_s)

    async def delete(self, key: str, expected: Stored) -> bool:
        return await self._swap(key, expected.value, "", 0.0)

    async def _swap(self, key: str, old: str, new: str, ttl_s: float) -> bool:
        try:
            args = [old, new, max(1, int(ttl_s * 1000))]
            return bool(await self._cas(keys=[self._prefix + key], args=args))
        except RedisError as error:
            raise ConnectionError(f"redis: {error}") from error

    async def close(self) -> None:
        await self._client.aclose()


def make_unique_store(settings: ProducerSettings, url: str) -> RedisUniqueStore:
    """The store `unique.url` names (`redis://`, `rediss://`, `unix://`); connects lazily."""
    timeout = settings.unique.timeout_s
    client = redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    return RedisUniqueStore(client, settings.unique.namespace)
