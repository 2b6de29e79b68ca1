"""NATS KV idempotency store: one key per job in the bucket `<namespace>_idempotency`.

Every write is conditional on the key's last revision (`Nats-Expected-Last-Subject-Sequence`),
so the server decides races: a claim is an atomic *create* (revision 0: the key must not
exist), and renew, release and complete only replace the revision this store read or
wrote. Two deliveries can therefore never both hold a claim. The value names the
delivery's token; the stamp `holder` returns is the token and the key's revision, which
every renewal moves, and `take_over` writes at exactly that revision.

Expiry: each value carries its expiry time, checked on read, and each message carries a
per-message TTL (`Nats-TTL`, whole seconds, rounded up), so the server removes stale
claims (`HOLD_LEASES` leases after their last write) and completions (`retention_s`) by
itself. Leases are not judged here: a waiting delivery takes a claim over only after it
saw it unchanged for a whole lease by its own clock (`steps/_idempotency.py`), so worker
clocks need not agree.

Keys are base64url-encoded (KV keys allow only `[-/_=.a-zA-Z0-9]`), so any idempotency key
works and `nats kv get` still finds an entry.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError

from consumer.stores import HOLD_LEASES, ClaimState
from producer import NatsSettings
from producer.nats import connect_nats

_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: the expected last revision did not match
_KV_OPERATION = "KV-Operation"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_RACE_RETRIES = 8
_REQUEST_TIMEOUT_S = 5.0
_BUCKET_NAME = re.compile(r"[A-Za-z0-9_-]+")


class _Conflict(Exception):
    """Someone else wrote the key since we read it."""


@dataclass(frozen=True, slots=True)
class _Entry:
    done: bool
    owner: str
    expires: float  # time.time()

    def live(self) -> bool:
        return self.expires > time.time()


def bucket_name(namespace: str) -> str:
    """The idempotency bucket of `namespace` (`ValueError` if it cannot name a bucket)."""
    if not _BUCKET_NAME.fullmatch(namespace):
        msg = f"idempotency namespace {namespace!r} must be letters, digits, '_' or '-' (NATS KV)"
        raise ValueError(msg)
    return f"{namespace}_idempotency"


def bucket_config(
    namespace: str, retention_s: float, *, replicas: int = 1, max_bytes: int = -1
) -> KeyValueConfig:
    """The bucket's limits: one revision per key, nothing older than the retention."""
    return KeyValueConfig(
        bucket=bucket_name(namespace),
        history=1,
        ttl=retention_s,
        replicas=replicas,
        max_bytes=max_bytes,
        storage=StorageType.FILE,
        description="jobstream idempotency: claims and completed jobs",
    )


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> bool:
    """Create the bucket if it is missing; True if created now. An existing bucket is kept
    as it is (`jobstream topics ensure` brings its limits up to date)."""
    try:
        await js.key_value(config.bucket)
        return False
    except BucketNotFoundError:
        pass
    try:
        await js.create_key_value(config)
    except APIError:
        await js.key_value(config.bucket)  # created concurrently by another worker: fine
        return False
    return True


async def provision_bucket(js: JetStreamContext, config: KeyValueConfig) -> bool:
    """Create the bucket, or bring an existing one's limits (retention, size, replicas) up
    to `config`; True if created now."""
    if await ensure_bucket(js, config):
        return True
    info = await js.stream_info(f"KV_{config.bucket}")
    limits = {"max_age": config.ttl, "max_bytes": config.max_bytes, "num_replicas": config.replicas}
    if any(getattr(info.config, name) != value for name, value in limits.items()):
        await js.update_stream(info.config.evolve(**limits))
    return False


class NatsKvIdempotencyStore:
    def __init__(self, client: NatsClient, js: JetStreamContext, bucket: str) -> None:
        self._client = client
        self._js = js
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        # (key, token) -> the revision of the delivery's own claim, so renew, complete and
        # release replace exactly what it wrote.
        self._revisions: dict[tuple[str, str], int] = {}

    @classmethod
    async def connect(
        cls, settings: NatsSettings, namespace: str, retention_s: float
    ) -> NatsKvIdempotencyStore:
        config = bucket_config(namespace, retention_s)
        client = await connect_nats(settings)
        try:
            # A request lost with a dropped connection is failed (and retried by the runtime)
            # after this, instead of holding its job for the whole publish timeout.
            js = client.jetstream(timeout=min(settings.publish_timeout_s, _REQUEST_TIMEOUT_S))
            await ensure_bucket(js, config)
        except BaseException:
            await client.close()
            raise
        return cls(client, js, config.bucket)

    async def claim(self, key: str, token: str, lease_s: float) -> ClaimState:
        revision = 0  # first try an atomic create: the common case, one round trip
        for _ in range(_RACE_RETRIES):
            try:
                written = await self._write(key, _running(token, lease_s), revision)
            except _Conflict:
                revision, entry = await self._read(key)
                if entry is not None and entry.live():
                    if entry.done:
                        return ClaimState.COMPLETED
                    if entry.owner != token:
                        return ClaimState.BUSY
                continue  # free, gone or this token's own claim: take it at this revision
            self._revisions[(key, token)] = written
            return ClaimState.CLAIMED
        return ClaimState.BUSY  # lost every race: the runtime waits and asks again

    async def holder(self, key: str) -> str | None:
        revision, entry = await self._read(key)
        if entry is None or entry.done or not entry.live():
            return None
        return f"{entry.owner}#{revision}"

    async def take_over(self, key: str, holder: str, token: str, lease_s: float) -> bool:
        revision = int(holder.rpartition("#")[2])
        try:
            written = await self._write(key, _running(token, lease_s), revision)
        except _Conflict:
            return False  # renewed, completed or taken by another delivery meanwhile
        self._revisions[(key, token)] = written
        return True

    async def renew(self, key: str, token: str, lease_s: float) -> bool:
        revision = self._revisions.get((key, token))
        for _ in range(_RACE_RETRIES):
            if revision is None:
                # Our last write's reply may have been lost: the value says whose it is.
                revision, entry = await self._read(key)
                if entry is None or entry.done or entry.owner != token:
                    self._revisions.pop((key, token), None)
                    return False  # taken over, completed or gone
            try:
                written = await self._write(key, _running(token, lease_s), revision)
            except _Conflict:
                revision = None
                continue
            self._revisions[(key, token)] = written
            return True
        return False

    async def complete(self, key: str, token: str, retention_s: float) -> None:
        # The job's effect happened: record it even if the claim was taken over meanwhile.
        revision = self._revisions.pop((key, token), None)
        for _ in range(_RACE_RETRIES):
            if revision is None:
                revision, entry = await self._read(key)
                if entry is not None and entry.done and entry.live():
                    return
            try:
                await self._write(key, _Entry(True, token, _after(retention_s)), revision)
                return
            except _Conflict:
                revision = None
        msg = f"could not record the completion of {key!r}: the key changes constantly"
        raise RuntimeError(msg)

    async def release(self, key: str, token: str) -> None:
        revision = self._revisions.pop((key, token), None)
        if revision is None:
            revision, entry = await self._read(key)
            if entry is None or entry.done or entry.owner != token:
                return  # not this delivery's claim (any more)
        headers = {_KV_OPERATION: "DEL", _EXPECTED_LAST: str(revision)}
        try:
            await self._js.publish(self._subject(key), b"", headers=headers)
        except APIError as error:
            if error.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            # Someone else wrote the key since: it is not our claim any more.

    async def close(self) -> None:
        if not self._client.is_closed:
            await self._client.close()

    def _subject(self, key: str) -> str:
        return self._prefix + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")

    async def _read(self, key: str) -> tuple[int, _Entry | None]:
        """The key's revision (0 if it never existed or expired) and live-or-not entry
        (None when absent or deleted)."""
        try:
            message = await self._js.get_msg(self._stream, subject=self._subject(key))
        except NotFoundError:
            return 0, None
        revision = message.seq or 0
        if message.headers and message.headers.get(_KV_OPERATION) in ("DEL", "PURGE"):
            return revision, None
        value = json.loads(message.data or b"{}")
        return revision, _Entry(value.get("s") == "done", value.get("o", ""), value.get("x", 0))

    async def _write(self, key: str, entry: _Entry, revision: int) -> int:
        data = json.dumps(
            {"s": "done" if entry.done else "running", "o": entry.owner, "x": entry.expires}
        ).encode()
        ttl = max(1, math.ceil(entry.expires - time.time()))
        try:
            ack = await self._js.publish(
                self._subject(key), data, headers={_EXPECTED_LAST: str(revision)}, msg_ttl=ttl
            )
        except APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:
                raise _Conflict from error
            raise
        return ack.seq


def _after(seconds: float) -> float:
    return time.time() + seconds


def _running(token: str, lease_s: float) -> _Entry:
    return _Entry(False, token, _after(HOLD_LEASES * lease_s))
