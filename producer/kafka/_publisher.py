"""Kafka as a `Publisher`: an idempotent aiokafka producer with `acks=all`.

Guarantees:

- A receipt means every in-sync replica has the record (`acks=all`); the idempotent
  producer keeps per-partition order and drops its own retried duplicates.
- Nothing waits forever: `start()` gives up after `connect_timeout_s`; each publish after
  `publish_timeout_s` (the client's request timeout is capped to it, so a record the client
  still holds expires there instead of being retried long after). A timeout stays
  ambiguous: the broker may have stored the record and lost its answer.
- An idempotent session the broker no longer accepts (`OutOfOrderSequenceNumber` after
  batches expired in an outage, `InvalidProducerEpoch`) fails the publish as `BrokerBusy`
  (retriable) and the next publish runs on a new client (a new producer id): without this,
  every publish after such an outage would fail for good.
- A topic that does not exist fails fast with `DestinationMissing`, checked once per topic
  with a metadata request, instead of waiting for the client's metadata timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import DefaultPartitioner

from producer._errors import (
    BrokerBusy,
    BrokerUnavailable,
    DestinationMissing,
    PublishError,
    PublishTimeout,
    RecordTooLarge,
)
from producer._publisher import Receipt
from producer._settings import KafkaSettings, RoutingSettings, Transport
from producer.kafka._options import kafka_client_options
from producer.kafka._provision import ensure_kafka_topics
from producer.kafka._refusal import raise_if_refused
from producer.retrying import Backoff, retry
from schemas import JobMessage, to_kafka

__all__ = ["KafkaPublisher", "kafka_client_options"]

log = logging.getLogger("jobstream.producer")

_ID_HEADER = "ce_id"
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_PARTITIONER = DefaultPartitioner()
_CONNECT_ERRORS = (KafkaError, OSError, TimeoutError)
_CONNECT_BACKOFF = Backoff(initial_s=0.1, max_s=2.0)
# The broker no longer accepts this client's idempotent session: only a new client helps.
_STALE_SESSION = (OutOfOrderSequenceNumber, InvalidProducerEpoch, ProducerFenced)


def _unreachable(error: Exception, wait_s: float) -> None:
    log.debug("kafka not reachable yet (%r); retrying in %.1fs", error, wait_s)


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
        # One metadata check per topic at a time: a publish that starts while the first
        # check is under way awaits it instead of fetching the whole cluster's metadata
        # itself (at 1,000 publishes/s that herd stalled the loop for 130 to 190 ms).
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._stale = False  # the session was refused: replace the client before the next send
        self._renewing = asyncio.Lock()

    @property
    def transport(self) -> Transport:
        return "kafka"

    async def start(self) -> None:
        """Connect, retrying with backoff for up to `connect_timeout_s`."""
        if self._producer is not None:
            return
        deadline = time.monotonic() + self._settings.connect_timeout_s

        async def connect() -> Any:
            producer = self._new_producer()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await producer.start()
            except _CONNECT_ERRORS:
                await producer.stop()
                # aiokafka reports a refused login or certificate as "no broker answered":
                # one connection of our own tells which (a permanent `BrokerRefused`).
                await raise_if_refused(self._settings, deadline - time.monotonic())
                raise
            return producer

        try:
            self._producer = await retry(
                connect,
                on=_CONNECT_ERRORS,
                backoff=_CONNECT_BACKOFF,
                deadline=deadline,
                last_try_at_deadline=True,
                on_retry=_unreachable,
            )
        except _CONNECT_ERRORS as error:
            servers = self._settings.bootstrap_servers
            raise BrokerUnavailable("kafka", servers, _describe(error)) from error

    async def stop(self) -> None:
        """Deliver what is queued (bounded by the request timeout), then disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        await self._renew_if_stale()
        key, headers = to_kafka(message.attributes)
        future = await self._enqueue(destination, key, headers, message.body)
        async with self._deadline(destination):
            return await self._receipt(message.attributes.id, destination, future)

    async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
        # Build record batches per partition ourselves and hand each over whole: about four
        # times cheaper per record than `send()`, and the partition of a key is the one
        # `send()` picks (aiokafka's default partitioner), so `send` and `send_many` agree.
        await self._renew_if_stale()
        producer = self._running()
        layout: dict[str, tuple[list[int], list[int]]] = {}  # topic -> (all, available)
        for topic in dict.fromkeys(topic for topic, _ in items):
            layout[topic] = await self._layout(topic)
        open_batches: dict[tuple[str, int], _Batch] = {}
        submitted: list[_Batch] = []
        # Per item: its batch and its offset in the batch (two lists, not a tuple per job:
        # fewer objects for the garbage collector to track while a large batch is sent).
        batch_of: list[_Batch] = []
        offset_in: list[int] = []
        try:
            for topic, message in items:
                key, headers = to_kafka(message.attributes)
                partition = int(_PARTITIONER(key, *layout[topic]))
                batch = open_batches.get((topic, partition))
                if batch is None:
                    batch = open_batches[(topic, partition)] = _Batch(producer, topic, partition)
                relative = batch.append(key, message.body, headers)
                if relative is None:  # full: send it, start the next one
                    await self._submit(batch)
                    submitted.append(batch)
                    batch = open_batches[(topic, partition)] = _Batch(producer, topic, partition)
                    relative = batch.append(key, message.body, headers)
                    if relative is None:
                        msg = f"job {message.attributes.id} is larger than kafka.max_batch_bytes"
                        raise PublishError(msg)
                batch_of.append(batch)
                offset_in.append(relative)
            for batch in open_batches.values():
                await self._submit(batch)
                submitted.append(batch)
            async with self._deadline(submitted[-1].topic if submitted else ""):
                for batch in submitted:
                    batch.base_offset = (await batch.future()).offset
        except BaseException:
            _discard(b.future() for b in submitted)
            raise
        return [
            Receipt(
                message.attributes.id,
                "kafka",
                batch.topic,
                batch.partition,
                batch.base_offset + relative,
            )
            for (_, message), batch, relative in zip(items, batch_of, offset_in, strict=True)
        ]

    async def send_record(
        self, topic: str, key: bytes | None, headers: list[tuple[str, bytes]], value: bytes
    ) -> Receipt:
        """Publish a raw record as-is: the worker's path to retry and dead-letter topics."""
        job_id = next(
            ((v or b"").decode(errors="replace") for n, v in headers if n == _ID_HEADER), ""
        )
        await self._renew_if_stale()
        future = await self._enqueue(topic, key, headers, value)
        async with self._deadline(topic):
            return await self._receipt(job_id, topic, future)

    async def ping(self, timeout_s: float) -> None:
        """A metadata request to the cluster within `timeout_s` (`BrokerUnavailable`)."""
        producer = self._running()
        try:
            async with asyncio.timeout(timeout_s):
                await producer.client.fetch_all_metadata()
        except (KafkaError, OSError, TimeoutError) as error:
            address = self._settings.bootstrap_servers
            raise BrokerUnavailable("kafka", address, _describe(error)) from error

    async def check(self, destinations: Sequence[str]) -> None:
        """Raise `DestinationMissing` naming every topic in `destinations` that does not
        exist (without creating any); the worker calls this at start."""
        missing: list[str] = []
        for topic in dict.fromkeys(destinations):
            if topic not in self._known_topics:
                try:
                    await self._check_topic(topic)
                except DestinationMissing:
                    missing.append(topic)
        if missing:
            raise DestinationMissing("kafka", ", ".join(missing))

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

    async def _renew_if_stale(self) -> None:
        """Replace a client whose idempotent session the broker refused (`_STALE_SESSION`):
        stop it (bounded by the connect timeout; what it still holds is dropped, and was
        reported failed to its callers) and connect a new one."""
        if not self._stale:
            return
        async with self._renewing:
            if not self._stale:
                return
            old, self._producer = self._producer, None
            if old is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._settings.connect_timeout_s):
                        await old.stop()
            log.warning("kafka: the broker refused the idempotent session; reconnecting")
            await self.start()
            self._stale = False

    def _running(self) -> Any:
        if self._producer is None:
            msg = "KafkaPublisher is not started: await start() (or use `async with JobProducer`)"
            raise RuntimeError(msg)
        return self._producer

    async def _check_topic(self, topic: str) -> None:
        """Fail fast if `topic` does not exist; else make the client track its metadata.
        Concurrent callers share one check; a caller cancelled meanwhile does not cancel
        it for the others."""
        check = self._checks.get(topic)
        if check is None:
            check = self._checks[topic] = asyncio.create_task(self._check_topic_once(topic))
            check.add_done_callback(functools.partial(self._check_done, topic))
        await asyncio.shield(check)

    def _check_done(self, topic: str, check: asyncio.Task[None]) -> None:
        self._checks.pop(topic, None)
        if not check.cancelled():
            check.exception()  # retrieved: its callers, if any are left, raise it

    async def _check_topic_once(self, topic: str) -> None:
        producer = self._running()
        if producer.client.cluster.partitions_for_topic(topic) is None:
            try:
                async with asyncio.timeout(self._timeout):
                    metadata = await producer.client.fetch_all_metadata()
            except (KafkaError, TimeoutError) as error:
                address = self._settings.bootstrap_servers
                raise BrokerUnavailable("kafka", address, _describe(error)) from error
            if metadata.partitions_for_topic(topic) is None:
                raise DestinationMissing("kafka", topic)
        try:
            await producer.partitions_for(topic)  # tracked from now on, refreshed by aiokafka
        except KafkaError as error:
            raise self._translate(error, topic) from error
        self._known_topics.add(topic)

    async def _layout(self, topic: str) -> tuple[list[int], list[int]]:
        """All and available partitions of `topic`, for the partitioner."""
        producer = self._running()
        if topic not in self._known_topics:
            await self._check_topic(topic)
        try:
            every = sorted(await producer.partitions_for(topic))  # cached by the client
        except KafkaError as error:
            raise self._translate(error, topic) from error
        available = sorted(producer.client.cluster.available_partitions_for_topic(topic) or ())
        return every, available or every

    async def _submit(self, batch: _Batch) -> None:
        try:
            batch.submitted = await batch.producer.send_batch(
                batch.builder, batch.topic, partition=batch.partition
            )
        except KafkaError as error:
            raise self._translate(error, batch.topic) from error

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
        """The publish error for `error`, classified by what it causes (`producer._errors`):
        the broker's own `retriable` flag decides transient or permanent."""
        if isinstance(error, KafkaTimeoutError):
            return PublishTimeout("kafka", topic, self._timeout)
        if isinstance(error, UnknownTopicOrPartitionError):
            self._known_topics.discard(topic)
            return DestinationMissing("kafka", topic)
        if isinstance(error, _TOO_LARGE):
            return RecordTooLarge("kafka", topic, _describe(error))
        if isinstance(error, KafkaConnectionError):
            address = self._settings.bootstrap_servers
            return BrokerUnavailable("kafka", address, _describe(error))
        stale = isinstance(error, _STALE_SESSION)
        self._stale = self._stale or stale
        if error.retriable or stale:
            detail = _describe(error) + ("; reconnecting" if stale else "")
            return BrokerBusy("kafka", topic, detail)
        return PublishError(f"kafka refused the publish to {topic!r}: {_describe(error)}")


def _describe(error: BaseException) -> str:
    name = type(error).__name__
    text = str(error).removeprefix(f"{name}: ")
    if "Unable to bootstrap" in text:
        return f"{name}: no broker answered"
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


class _Batch:
    """Records for one partition, built by us and handed to aiokafka in one piece."""

    def __init__(self, producer: Any, topic: str, partition: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.builder = producer.create_batch()
        self.submitted: asyncio.Future[Any] | None = None
        self.base_offset = -1

    def append(
        self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> int | None:
        """The record's offset within the batch, or None if the batch is full."""
        metadata = self.builder.append(timestamp=None, key=key, value=value, headers=headers)
        return None if metadata is None else int(metadata.offset)

    def future(self) -> asyncio.Future[Any]:
        assert self.submitted is not None
        return self.submitted
