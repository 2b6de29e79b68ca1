"""Redis idempotency store: one key per job, claims as `running:<owner>` with a TTL.

Each operation is one Lua script, so check-and-set is atomic on the server; expired claims
disappear by themselves (the lease), completed ids after `retention_s`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, cast

import redis.asyncio as redis

from consumer.stores._idempotency import ClaimState

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'claimed'
end
if v == 'done' then return 'completed' end
return 'busy'
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyStore:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._prefix = f"{namespace}:idem:"
        self._claim: Any = client.register_script(_CLAIM)
        self._renew: Any = client.register_script(_RENEW)
        self._release: Any = client.register_script(_RELEASE)

    @classmethod
    async def connect(cls, url: str, namespace: str) -> RedisIdempotencyStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5
        )
        await cast("Awaitable[Any]", client.ping())
        return cls(client, namespace)

    async def claim(self, key: str, owner: str, lease_s: float) -> ClaimState:
        result = await self._claim(keys=[self._prefix + key], args=[_running(owner), _ms(lease_s)])
        return ClaimState(result)

    async def renew(self, key: str, owner: str, lease_s: float) -> bool:
        renewed = await self._renew(keys=[self._prefix + key], args=[_running(owner), _ms(lease_s)])
        return bool(renewed)

    async def complete(self, key: str, owner: str, retention_s: float) -> None:
        await cast(
            "Awaitable[Any]", self._client.set(self._prefix + key, "done", px=_ms(retention_s))
        )

    async def release(self, key: str, owner: str) -> None:
        await self._release(keys=[self._prefix + key], args=[_running(owner)])

    async def close(self) -> None:
        await self._client.aclose()


def _running(owner: str) -> str:
    return f"running:{owner}"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
