"""Client options derived from the settings, shared by every Kafka and NATS client we
create (producer, worker, admin), so TLS and SASL are configured in exactly one place."""

from __future__ import annotations

import ssl
from typing import Any

from producer._settings import KafkaSettings

__all__ = ["kafka_client_options"]


def kafka_client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments common to aiokafka's producer, consumer and admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ssl_cafile)
    if settings.ssl_certfile is not None:
        password = settings.ssl_password.get_secret_value() if settings.ssl_password else None
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password)
    return context
