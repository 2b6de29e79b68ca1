"""The options every aiokafka client of jobstream (producer, consumer, admin) is built with."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from producer._refusals import file_refused
from producer._settings import KafkaSettings

__all__ = ["kafka_client_options"]


def kafka_client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client (producer, consumer, admin) needs to reach
    the cluster: addresses, client id, request timeout, TLS and SASL. `ValueError` naming
    `kafka.sasl_password_file`, `kafka.ssl_cafile` or `kafka.ssl_certfile` if that file
    cannot be read or loaded."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        password = settings.ssl_password.get_secret_value() if settings.ssl_password else None
        try:
            context = create_ssl_context(cafile=settings.ssl_cafile)
        except (OSError, ssl.SSLError) as error:
            raise file_refused(error, "kafka.ssl_cafile", settings.ssl_cafile) from None
        if settings.ssl_certfile is not None:
            try:
                context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password)
            except (OSError, ssl.SSLError) as error:
                setting = "kafka.ssl_certfile (and kafka.ssl_keyfile)"
                raise file_refused(error, setting, settings.ssl_certfile) from None
        options["ssl_context"] = context
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password_text()
        if password is not None:
            options["sasl_plain_password"] = password
    return options
