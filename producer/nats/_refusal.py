"""Telling a refused NATS connection from an unreachable server (docs/security.md)."""

from __future__ import annotations

import nats.errors

from producer._refusals import tls_refusal
from producer._settings import NatsSettings

__all__ = ["nats_refusal"]


def nats_refusal(settings: NatsSettings, error: BaseException) -> str | None:
    """The reason and the setting to fix when `error` is a refusal no retry cures (the
    server rejected the credentials, or the client rejected its certificate), else None."""
    why = tls_refusal(error, "nats.tls_ca_file", "nats.servers")
    if why is not None:
        return why
    text = str(error).lower()
    if isinstance(error, nats.errors.AuthorizationError) or "authorization violation" in text:
        which = _credentials(settings)
        return f"the credentials were refused (Authorization Violation); check {which}"
    return None


def _credentials(settings: NatsSettings) -> str:
    """The credential settings in use: the ones to check."""
    if settings.credentials_file is not None:
        return "nats.credentials_file"
    if settings.nkey_seed_file is not None:
        return "nats.nkey_seed_file (its public key must be a user of the server)"
    if settings.user is not None:
        return "nats.user and nats.password (or nats.password_file)"
    if settings.token is not None or settings.token_file is not None:
        return "nats.token (or nats.token_file)"
    return (
        "the credentials: the server wants some, none is set (nats.user and nats.password, "
        "nats.nkey_seed_file, nats.credentials_file or nats.token)"
    )
