"""Unique keys in a JetStream key-value bucket, `<namespace>_unique` (nats-py).

Compare-and-set is JetStream's own: `create` (the key is absent or deleted) and `update` /
`delete` with the revision the caller read. The bucket keeps one revision per key and drops
records `unique.max_for_s + unique.lease_s` after their last write (`max_age`); a record
whose window is over is treated as absent by `UniqueKeys` before that. Keys are the unique
keys in base64url (NATS KV allows only `[-/_=.a-zA-Z0-9]`). It connects on first use with
the `nats` connection settings (`nats://host:port` in `unique.url` replaces their servers),
creates the bucket if missing and raises an existing one's `max_age` if it is too short.
Connection failures raise `ConnectionError` (`UniqueStoreUnavailable` for the caller).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError
from nats.js.errors import KeyWrongLastSequenceError as _WrongRevision
from nats.js.kv import KeyValue

from producer._errors import BrokerUnavailable
from producer._settings import NatsSettings, ProducerSettings
from producer._unique import Stored
from producer.nats import connect_nats

__all__ = ["NatsUniqueStore", "make_unique_store"]

_WRONG_LAST_SEQUENCE = (10071, 10164)


class NatsUniqueStore:
    def __init__(self, settings: NatsSettings, bucket: str, max_age_s: float) -> None:
        self._settings = settings
        self._config = KeyValueConfig(
            bucket=bucket,
            history=1,
            ttl=max_age_s,
            storage=StorageType.FILE,
            description="jobstream unique keys (docs/scheduling.md#unique-jobs)",
        )
        self._client: NatsClient | None = None
        self._kv: KeyValue | None = None
        self._opening = asyncio.Lock()

    async def get(self, key: str) -> Stored | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(_key(key))
        except KeyNotFoundError:  # absent, or deleted
            return None
        except (nats.errors.Error, APIError) as error:
            raise ConnectionError(f"nats kv: {error!r}") from error
        return Stored((entry.value or b"").decode(), entry.revision or 0)

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        kv = await self._bucket()
        try:
            if expected is None:
                await kv.create(_key(key), value.encode())
            else:
                await kv.update(_key(key), value.encode(), last=expected.version)
        except _WrongRevision:
            return False
        except APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise ConnectionError(f"nats kv: {error!r}") from error
        except nats.errors.Error as error:
            raise ConnectionError(f"nats kv: {error!r}") from error
        return True

    async def delete(self, key: str, expected: Stored) -> bool:
        kv = await self._bucket()
        try:
            await kv.delete(_key(key), last=expected.version)
        except APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:
                return False
            raise ConnectionError(f"nats kv: {error!r}") from error
        except nats.errors.Error as error:
            raise ConnectionError(f"nats kv: {error!r}") from error
        return True

    async def close(self) -> None:
        client, self._client, self._kv = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _bucket(self) -> KeyValue:
        if self._kv is not None:
            return self._kv
        async with self._opening:
            if self._kv is not None:
                return self._kv
            try:
                client = await connect_nats(self._settings)
            except BrokerUnavailable as error:
                raise ConnectionError(str(error)) from error
            try:
                self._kv = await _ensure_bucket(client.jetstream(), self._config)
            except (nats.errors.Error, APIError) as error:
                with contextlib.suppress(Exception):
                    await client.close()
                raise ConnectionError(f"nats kv: {error!r}") from error
            self._client = client
            return self._kv


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket, created if missing; an existing one's `max_age` raised to `config.ttl`."""
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(config)
        except APIError:  # created at the same moment by another producer
            return await js.key_value(config.bucket)
    info = await js.stream_info(f"KV_{config.bucket}")
    max_age = info.config.max_age or 0  # 0: no limit
    if config.ttl is not None and 0 < max_age < config.ttl:
        await js.update_stream(info.config.evolve(max_age=config.ttl))
    return kv


def _key(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def make_unique_store(settings: ProducerSettings, url: str) -> NatsUniqueStore:
    """The store `unique.url` names (`nats://`: the `nats` settings; with a host, its
    servers replace theirs); connects on first use."""
    nats_settings = settings.nats
    if url.rstrip("/") != "nats:":
        nats_settings = nats_settings.model_copy(update={"servers": [url]})
    unique = settings.unique
    return NatsUniqueStore(
        nats_settings, f"{unique.namespace}_unique", unique.max_for_s + unique.lease_s
    )
