"""The options every aiokafka client of jobstream (producer, consumer, admin) is built with."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from producer._settings import KafkaSettings

__all__ = ["kafka_client_options"]


def kafka_client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client (producer, consumer, admin) needs to reach
    the cluster: addresses, client id, request timeout, TLS and SASL. `ValueError` naming
    `kafka.sasl_password_file` if that file cannot be read."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        password = settings.ssl_password.get_secret_value() if settings.ssl_password else None
        options["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
            password=password,
        )
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password_text()
        if password is not None:
            options["sasl_plain_password"] = password
    return options
