"""Redis idempotency store: one key per job, claims as `running:<token>#<version>`.

Each operation is one Lua script, so check-and-set is atomic on the server. A renewal
bumps the version, so the stamp `holder` returns changes while the holder is alive, and
`take_over` replaces only the stamp the waiting delivery saw. Running claims disappear by
themselves `HOLD_LEASES` leases after their last write, completed ids after `retention_s`.
Claims and completions made in one turn of the event loop go as one pipeline
(`_batching.MicroBatch`, not a transaction: each script stays atomic on its own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, cast

import redis.asyncio as redis

from consumer.stores._batching import MicroBatch
from consumer.stores._idempotency import HOLD_LEASES, ClaimState

# ARGV[1] is `running:<token>#`: a token never contains '#', so the prefix names it alone.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1] .. '0', 'PX', ARGV[2])
  return 'claimed'
end
if v == 'done' then return 'completed' end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 'claimed'
end
return 'busy'
"""
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2] .. '0', 'PX', ARGV[3])
  return 1
end
return 0
"""
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  local version = tonumber(string.sub(v, #ARGV[1] + 1)) + 1
  redis.call('SET', KEYS[1], ARGV[1] .. version, 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisIdempotencyStore:
    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._prefix = f"{namespace}:idem:"
        self._claim: Any = client.register_script(_CLAIM)
        self._take_over: Any = client.register_script(_TAKE_OVER)
        self._renew: Any = client.register_script(_RENEW)
        self._release: Any = client.register_script(_RELEASE)
        self._claims: MicroBatch[tuple[str, str, float], ClaimState] = MicroBatch(self._claim_batch)
        self._completions: MicroBatch[tuple[str, float], None] = MicroBatch(self._complete_batch)

    @classmethod
    async def connect(cls, url: str, namespace: str) -> RedisIdempotencyStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5
        )
        await cast("Awaitable[Any]", client.ping())
        return cls(client, namespace)

    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
        return await self._claims((key, token, lease_s))

    async def _claim_batch(
        self, claims: Sequence[tuple[str, str, float]]
    ) -> list[ClaimState | Exception]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, token, lease_s in claims:
                await self._claim(
                    keys=[self._prefix + key], args=[_running(token), _hold(lease_s)], client=pipe
                )
            answers = await pipe.execute(raise_on_error=False)
        return [a if isinstance(a, Exception) else ClaimState(a) for a in answers]

    async def holder(self, key: str) -> str | None:
        value = await cast("Awaitable[Any]", self._client.get(self._prefix + key))
        return value if isinstance(value, str) and value.startswith("running:") else None

    async def take_over(self, key: str, holder: str, token: str, lease_s: float) -> bool:
        args = [holder, _running(token), _hold(lease_s)]
        return bool(await self._take_over(keys=[self._prefix + key], args=args))

    async def renew(self, key: str, token: str, lease_s: float) -> bool:
        renewed = await self._renew(
            keys=[self._prefix + key], args=[_running(token), _hold(lease_s)]
        )
        return bool(renewed)

    async def complete(self, key: str, token: str, retention_s: float) -> None:
        await self._completions((key, retention_s))

    async def _complete_batch(
        self, completions: Sequence[tuple[str, float]]
    ) -> list[Exception | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, retention_s in completions:
                pipe.set(self._prefix + key, "done", px=_ms(retention_s))
            answers = await pipe.execute(raise_on_error=False)
        return [a if isinstance(a, Exception) else None for a in answers]

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[self._prefix + key], args=[_running(token)])

    async def close(self) -> None:
        await self._claims.close()
        await self._completions.close()
        await self._client.aclose()


def _running(token: str) -> str:
    return f"running:{token}#"


def _hold(lease_s: float) -> int:
    return _ms(HOLD_LEASES * lease_s)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
