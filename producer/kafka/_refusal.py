"""Telling a refused Kafka connection from an unreachable broker (docs/security.md).

aiokafka logs why a bootstrap connection failed and raises "Unable to bootstrap": a wrong
SASL password and a broker that is down look alike to the caller. `raise_if_refused` opens
one connection of its own to the first bootstrap server, which raises the real cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from producer._errors import BrokerRefused, BrokerUnavailable
from producer._refusals import tls_refusal
from producer._settings import KafkaSettings
from producer.kafka._options import kafka_client_options

__all__ = ["raise_if_refused", "start_client"]

_SASL_ERRORS = (SaslAuthenticationFailed, IllegalSaslStateError)
_CREDENTIALS = "kafka.sasl_username and kafka.sasl_password (or kafka.sasl_password_file)"


async def raise_if_refused(settings: KafkaSettings, timeout_s: float) -> None:
    """`BrokerRefused` naming the setting to fix if the first bootstrap server refuses a
    connection made with `settings` (credentials, CA, host name); returns otherwise (the
    broker is down, slow, or accepted us), within `timeout_s` (none left: no probe)."""
    if timeout_s <= 0:
        return
    first = settings.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    options: dict[str, Any] = kafka_client_options(settings)
    try:
        async with asyncio.timeout(timeout_s):
            connection = await create_conn(
                host.strip("[]") or port,
                int(port) if host else 9092,  # aiokafka's default port
                client_id=options["client_id"],
                request_timeout_ms=options["request_timeout_ms"],
                security_protocol=options["security_protocol"],
                ssl_context=options.get("ssl_context"),
                sasl_mechanism=options.get("sasl_mechanism", "PLAIN"),
                sasl_plain_username=options.get("sasl_plain_username"),
                sasl_plain_password=options.get("sasl_plain_password"),
            )
    except UnsupportedSaslMechanismError:
        detail = (
            f"the broker does not offer SASL mechanism {options.get('sasl_mechanism')} on this "
            "listener; check kafka.sasl_mechanism (and kafka.security_protocol)"
        )
        raise BrokerRefused("kafka", first, detail) from None
    except _SASL_ERRORS as error:
        detail = f"the credentials were refused ({type(error).__name__}); check {_CREDENTIALS}"
        raise BrokerRefused("kafka", first, detail) from None
    except OSError as error:
        why = tls_refusal(error, "kafka.ssl_cafile", "kafka.bootstrap_servers")
        if why is not None:
            raise BrokerRefused("kafka", first, why) from None
    except (Exception, TimeoutError):  # noqa: BLE001 - anything else: not a refusal we know
        return
    else:
        connection.close()


async def start_client(client: Any, settings: KafkaSettings) -> None:
    """`await client.start()` for an aiokafka consumer, producer or admin client, with its
    failure said as the producer says it: `BrokerRefused` naming the setting to fix, or
    `BrokerUnavailable` (the client is stopped either way)."""
    try:
        await client.start()
    except (KafkaError, OSError, TimeoutError) as error:
        with contextlib.suppress(Exception):
            await (client.close() if hasattr(client, "close") else client.stop())
        await raise_if_refused(settings, settings.connect_timeout_s)
        raise BrokerUnavailable(
            "kafka", settings.bootstrap_servers, f"{type(error).__name__}: {error}"
        ) from None
