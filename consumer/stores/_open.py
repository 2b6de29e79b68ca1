"""Open the stores the settings name: idempotency (memory, Redis, PostgreSQL) and status.

The `nats-kv` backend is a JetStream bucket: the NATS backend opens it
(`consumer.nats.open_kv_store`, chosen in `consumer/_backends.py`), so this package never
imports nats-py.
"""

from __future__ import annotations

import ssl

from consumer.core import IdempotencySettings, Settings
from consumer.stores._idempotency import IdempotencyStore, MemoryIdempotencyStore
from consumer.stores._status import MemoryStatusStore, StatusStore
from consumer.stores._status_redis import RedisStatusStore
from producer.secrets import with_password


async def open_store(
    settings: IdempotencySettings, *, max_connections: int = 8
) -> IdempotencyStore:
    """The store `settings.backend` names, connected. Raises `ValueError` for `nats-kv`,
    which `consumer._backends.open_idempotency_store` opens through the NATS backend.
    `max_connections`: the PostgreSQL pool's bound (a transactional handler holds one
    connection while it runs: the worker passes its `max_in_flight` plus room for the
    claims, renewals and completions)."""
    if settings.backend == "memory":
        return MemoryIdempotencyStore()
    url = settings.url.get_secret_value() if settings.url else ""
    url = with_password(url, settings.password_file, "idempotency.password_file")
    if settings.backend == "redis":
        from consumer.stores._redis import RedisIdempotencyStore  # noqa: PLC0415 - optional

        return await RedisIdempotencyStore.connect(url, settings.namespace)
    if settings.backend == "postgres":
        from consumer.stores._postgres import PostgresIdempotencyStore  # noqa: PLC0415

        return await PostgresIdempotencyStore.connect(
            url, settings.namespace, max_connections=max_connections
        )
    msg = f"idempotency backend {settings.backend!r} is opened by its broker backend"
    raise ValueError(msg)


async def open_status_store(
    backend: str, url: str | None, namespace: str, retention_s: float
) -> StatusStore | None:
    if backend == "none":
        return None
    if backend == "memory":
        return MemoryStatusStore()
    return await RedisStatusStore.connect(url or "", namespace, retention_s)


async def open_status(settings: Settings) -> StatusStore | None:
    """The configured status store, connected (None when `status.backend` is `none`)."""
    status = settings.status
    url = status.url.get_secret_value() if status.url else None
    if url is not None:
        url = with_password(url, status.password_file, "status.password_file")
    return await open_status_store(status.backend, url, status.namespace, status.retention_s)


_REFUSALS = (
    "password authentication failed",  # PostgreSQL
    "no password supplied",  # PostgreSQL: the server wants one, the settings give none
    "no pg_hba.conf entry",  # PostgreSQL: no rule lets this user, host or TLS state in
    "pg_hba.conf rejects connection",  # PostgreSQL: a rule refuses it (e.g. without TLS)
    "does not match host name",  # PostgreSQL: a certificate for another host
    "root certificate file",  # PostgreSQL: `sslrootcert` missing or unreadable
    "certificate verify failed",  # TLS: an untrusted certificate, or one for another host
    "no certificate or crl found",  # Redis: `ssl_ca_certs` is not PEM
    "invalid username-password pair",  # Redis AUTH
    "invalid password",  # Redis AUTH (older servers)
    "authentication required",  # Redis: the server wants a password, none was sent
)


def store_refused(error: BaseException) -> bool:
    """Whether `error` is a store refusing the connection (credentials, certificate): no
    retry cures it (docs/security.md)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if any(reason in str(seen).lower() for reason in _REFUSALS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
