"""Kafka as a `Publisher`: an idempotent aiokafka producer with `acks=all`.

Guarantees:

- A receipt means every in-sync replica has the record (`acks=all`); the idempotent
  producer keeps per-partition order and drops its own retried duplicates.
- Nothing waits forever: `start()` gives up after `connect_timeout_s`; each publish after
  `publish_timeout_s` (the client's request timeout is capped to it, so a record that was
  not delivered in time expires inside the client instead of being sent later).
- A topic that does not exist fails fast with `DestinationMissing`, checked once per topic
  with a metadata request, instead of waiting for the client's metadata timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError
from aiokafka.helpers import create_ssl_context

from producer._errors import BrokerUnavailable, DestinationMissing, PublishError, PublishTimeout
from producer._provision import ensure_kafka_topics
from producer._publisher import Receipt
from producer._settings import KafkaSettings, RoutingSettings, Transport
from schemas import JobMessage, to_kafka

__all__ = ["KafkaPublisher", "kafka_client_options"]

log = logging.getLogger("jobstream.producer")

_ID_HEADER = "ce_id"
_MAX_BACKOFF_S = 2.0


def kafka_client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client (producer, consumer, admin) needs to reach
    the cluster: addresses, client id, request timeout, TLS and SASL."""
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
        if settings.sasl_password is not None:
            options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


class KafkaPublisher:
    """Publishes jobs to Kafka topics. Use through `JobProducer`, or directly for raw
    records (`send_record`, the worker's retry and dead-letter path)."""

    def __init__(self, settings: KafkaSettings, routing: RoutingSettings | None = None) -> None:
        """`routing` gives partitions and replication factor of topics `ensure` creates."""
        self._settings = settings
        self._routing = routing if routing is not None else RoutingSettings()
        self._timeout = settings.publish_timeout_s
        self._producer: Any = None
        self._known_topics: set[str] = set()

    @property
    def transport(self) -> Transport:
        return "kafka"

    async def start(self) -> None:
        """Connect, retrying with backoff for up to `connect_timeout_s`."""
        if self._producer is not None:
            return
        deadline = time.monotonic() + self._settings.connect_timeout_s
        backoff = 0.1
        while True:
            producer = self._new_producer()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await producer.start()
            except (KafkaError, OSError, TimeoutError) as error:
                await producer.stop()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnavailable(
                        "kafka", self._settings.bootstrap_servers, _describe(error)
                    ) from error
                log.debug("kafka not reachable yet (%r); retrying in %.1fs", error, backoff)
                await asyncio.sleep(min(backoff, left))  # the last attempt is at the deadline
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
            else:
                self._producer = producer
                return

    async def stop(self) -> None:
        """Deliver what is queued (bounded by the request timeout), then disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        key, headers = to_kafka(message.attributes)
        future = await self._enqueue(destination, key, headers, message.body)
        async with self._deadline(destination):
            return await self._receipt(message.attributes.id, destination, future)

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        # Queue everything first (the client batches per partition), then collect the
        # acknowledgements; they arrive roughly in order, so awaiting them in order is cheap.
        queued: list[tuple[str, str, asyncio.Future[Any]]] = []
        try:
            for destination, message in items:
                key, headers = to_kafka(message.attributes)
                future = await self._enqueue(destination, key, headers, message.body)
                queued.append((message.attributes.id, destination, future))
            receipts: list[Receipt] = []
            last = queued[-1][1] if queued else ""
            async with self._deadline(last):
                for job_id, destination, future in queued:
                    receipts.append(await self._receipt(job_id, destination, future))
        except BaseException:
            _discard(f for _, _, f in queued)
            raise
        return receipts

    async def send_record(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> Receipt:
        """Publish a raw record as-is: the worker's path to retry and dead-letter topics."""
        job_id = next((v.decode(errors="replace") for n, v in headers if n == _ID_HEADER), "")
        future = await self._enqueue(topic, key, headers, value)
        async with self._deadline(topic):
            return await self._receipt(job_id, topic, future)

    async def ensure(self, destinations: Sequence[str]) -> list[str]:
        admin = AIOKafkaAdminClient(**kafka_client_options(self._settings))
        try:
            async with asyncio.timeout(self._settings.connect_timeout_s):
                await admin.start()
        except (KafkaError, OSError, TimeoutError) as error:
            await admin.close()
            address = self._settings.bootstrap_servers
            raise BrokerUnavailable("kafka", address, _describe(error)) from error
        try:
            created = await ensure_kafka_topics(admin, destinations, self._routing)
        except KafkaError as error:
            msg = f"kafka could not create topics ({_describe(error)}); check the broker"
            raise PublishError(msg) from error
        finally:
            await admin.close()
        self._known_topics.update(destinations)
        return created

    def _new_producer(self) -> Any:
        settings = self._settings
        options = kafka_client_options(settings)
        # Cap the client's own timeouts to ours, so an undelivered batch expires inside
        # aiokafka instead of being sent after we reported a timeout.
        request_timeout = min(settings.request_timeout_s, settings.publish_timeout_s)
        options["request_timeout_ms"] = int(request_timeout * 1000)
        return AIOKafkaProducer(
            **options,
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.linger_ms,
            max_batch_size=settings.max_batch_bytes,
            compression_type=None if settings.compression == "none" else settings.compression,
        )

    def _running(self) -> Any:
        if self._producer is None:
            msg = "KafkaPublisher is not started: await start() (or use `async with JobProducer`)"
            raise RuntimeError(msg)
        return self._producer

    async def _check_topic(self, topic: str) -> None:
        client = self._running().client
        if client.cluster.partitions_for_topic(topic) is None:
            try:
                async with asyncio.timeout(self._timeout):
                    metadata = await client.fetch_all_metadata()
            except (KafkaError, TimeoutError) as error:
                address = self._settings.bootstrap_servers
                raise BrokerUnavailable("kafka", address, _describe(error)) from error
            if metadata.partitions_for_topic(topic) is None:
                raise DestinationMissing("kafka", topic)
        self._known_topics.add(topic)

    async def _enqueue(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> asyncio.Future[Any]:
        """Hand a record to the client's batch. aiokafka bounds this by its request timeout
        (capped to ours) when the partition's batch is full."""
        producer = self._running()
        if topic not in self._known_topics:
            await self._check_topic(topic)
        try:
            future: asyncio.Future[Any] = await producer.send(
                topic, value, key=key, headers=headers
            )
        except KafkaError as error:
            raise self._translate(error, topic) from error
        return future

    async def _receipt(self, job_id: str, topic: str, future: asyncio.Future[Any]) -> Receipt:
        metadata = await future
        return Receipt(job_id, "kafka", metadata.topic, metadata.partition, metadata.offset)

    @contextlib.asynccontextmanager
    async def _deadline(self, topic: str) -> AsyncIterator[None]:
        """Bound waiting for acknowledgements by `publish_timeout_s`; translate errors."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError as error:
            raise PublishTimeout("kafka", topic, self._timeout) from error
        except KafkaError as error:
            raise self._translate(error, topic) from error

    def _translate(self, error: KafkaError, topic: str) -> PublishError:
        if isinstance(error, KafkaTimeoutError):
            return PublishTimeout("kafka", topic, self._timeout)
        if isinstance(error, UnknownTopicOrPartitionError):
            self._known_topics.discard(topic)
            return DestinationMissing("kafka", topic)
        return PublishError(f"kafka refused the publish to {topic!r}: {_describe(error)}")


def _describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    if isinstance(error, TimeoutError) and not text:
        return "timed out"
    return f"{name}: {text}" if text else name


def _discard(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Retrieve the outcome of futures nobody will await, so asyncio does not log them."""

    def consume(future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()

    for future in futures:
        future.add_done_callback(consume)
