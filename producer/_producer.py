"""`JobProducer`: publish typed jobs to Kafka, NATS JetStream or the in-memory broker.

    async with JobProducer() as producer:          # settings from JOBSTREAM_* variables
        receipt = await producer.publish(SendWelcomeEmail(user_id="42", ...), key="user-42")

Guarantees:

- `publish` returns after the broker acknowledged the job, or raises a `PublishError`
  subclass (or `InvalidAttributes` for oversized headers) and the job is not acknowledged.
- A `Job` instance is valid by construction and is not validated again; `publish_data`
  validates a plain payload first and raises `InvalidPayload` before anything is sent.
- Each `publish` is a PRODUCER span `send <destination>` (OpenTelemetry messaging
  conventions), a child of the caller's current span; its context travels as
  `traceparent`/`tracestate`. The caller's context is the job's origin
  (`joborigin`/`joboriginstate`), kept unchanged through retries, dead letters and replays
  (the publish span itself when the caller has none). `publish_many` gives each job a
  PRODUCER span `create <destination>` and wraps each pipelined batch in a CLIENT span
  `send`. With no OpenTelemetry SDK configured none of this records anything, and the
  caller's context (if any) travels as both.
- Nothing is created implicitly unless `create_missing=True`: then each destination is
  ensured once per producer, before its first publish.
- With a spool (`settings.spool.path`), a job the broker cannot take now (a retriable
  error) is stored durably on local disk and published when the broker is back: the
  receipt says `spooled=True` (`producer._spooling`). Without one, the error raises.
- A `PublishError` raised by `publish` carries the job's id (`error.job_id`).
- `publish_many` is pipelined (no round trip per job), returns receipts in input order, and
  holds at most `MAX_BATCH` encoded jobs at once. It is not atomic: if it raises, jobs
  before the failing one may be stored. Publishing them again with the same ids is safe.
- A publish with a `unique_key` first claims the key in the shared store (`unique.url`,
  `producer._unique_keys`): inside the key's window it returns the first job's receipt
  (`duplicate=True`) and publishes nothing. Without a `unique_key` the store is never used.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider

from producer import tracecontext as otel
from producer._backends import make_publisher
from producer._errors import PublishError
from producer._publisher import Publisher, Receipt
from producer._request import PublishRequest, due, encode_request
from producer._settings import Priority, ProducerSettings
from producer._spool_status import SpoolStatus
from producer._spooling import SpoolingSender
from producer._unique import UniqueStore, unique_window
from producer._unique_keys import HeldClaims, Reservation, UniqueKeys, open_unique_keys
from producer.tracecontext import TraceHeaders, current_trace_headers, traceparent_of
from schemas import Job, JobMessage, JobRegistry, default_registry, encode, validate_payload

__all__ = ["MAX_BATCH", "JobProducer", "PublishRequest"]

MAX_BATCH = 10_000
"""Most jobs `publish_many` encodes and hands to the publisher at once."""


class JobProducer:
    """Publishes jobs; an async context manager that connects on enter."""

    def __init__(
        self,
        settings: ProducerSettings | None = None,
        *,
        publisher: Publisher | None = None,
        registry: JobRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        unique_store: UniqueStore | None = None,
    ) -> None:
        """`settings` default to `ProducerSettings()` (environment and config file).
        `publisher` replaces the one `settings.transport` selects (e.g. a `MemoryPublisher`
        on a broker the test reads). `registry` resolves job types for `publish_data`.
        `tracer_provider` records the publish spans (default: the global one).
        `unique_store` replaces the store of unique keys `unique.url` names (e.g. one
        `MemoryUniqueStore` shared by the producers of a test)."""
        self._settings = settings if settings is not None else ProducerSettings()
        self._publisher = publisher if publisher is not None else make_publisher(self._settings)
        self._registry = registry if registry is not None else default_registry
        self._started = False
        self._ensured: set[str] = set()
        self._destinations: dict[tuple[str, Priority], str] = {}
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer_provider = provider
        self._tracer: Tracer = provider.get_tracer("jobstream.producer")
        spool = self._settings.spool
        self._spooling = (
            SpoolingSender(self._publisher, spool, self._ensure_missing)
            if spool.path is not None
            else None
        )
        self._unique: UniqueKeys | None = open_unique_keys(self._settings, unique_store)

    @property
    def settings(self) -> ProducerSettings:
        return self._settings

    @property
    def publisher(self) -> Publisher:
        return self._publisher

    async def start(self) -> None:
        """Connect to the broker; `BrokerUnavailable` if it cannot within the timeout.

        With a spool: lock and open it first (`SpoolLocked` if another process owns it),
        then try the broker once; if it cannot be reached, start anyway (jobs are spooled
        and a background drainer connects with backoff)."""
        if self._spooling is not None:
            await self._spooling.open()
        else:
            await self._publisher.start()
        self._started = True

    async def stop(self) -> None:
        """Wait for jobs already handed to the client, then disconnect. Idempotent.

        With a spool: first publish what it holds, for up to `spool.stop_drain_s`; the rest
        stays on disk for the next producer on that path."""
        self._started = False
        if self._spooling is not None:
            await self._spooling.close()
        await self._publisher.stop()
        if self._unique is not None:
            await self._unique.close()

    async def spool_status(self) -> SpoolStatus:
        """What the spool holds now: jobs, bytes, the oldest one's age, per destination.
        `RuntimeError` without a spool or before `start()`."""
        return await self._spool().status()

    async def flush_spool(self) -> int:
        """Publish every spooled job now; returns how many jobs were published from the
        spool meanwhile (by this call or the background drainer). Raises the first error
        (`BrokerUnavailable` if the broker cannot be reached). `RuntimeError` without a
        spool or before `start()`."""
        return await self._spool().flush()

    async def flush_spool_slots(self) -> tuple[int, list[Path]]:
        """Without `start()` (`jobstream spool flush`): publish what every slot file of the
        spool path holds that no process owns, then disconnect. Returns the jobs published
        and the slot files that running producers own (they drain those themselves).
        Raises as `flush_spool`, and `NotASpool` if a slot file is not a spool (it is left
        untouched). `RuntimeError` without a spool or once started."""
        if self._spooling is None:
            msg = "this producer has no spool: set spool.path (JOBSTREAM_SPOOL__PATH)"
            raise RuntimeError(msg)
        if self._started:
            msg = "flush_spool_slots is for a producer that is not started: use flush_spool"
            raise RuntimeError(msg)
        try:
            return await self._spooling.flush_every_slot()
        finally:
            await self._publisher.stop()

    def _spool(self) -> SpoolingSender:
        if self._spooling is None:
            msg = "this producer has no spool: set spool.path (JOBSTREAM_SPOOL__PATH)"
            raise RuntimeError(msg)
        self._check_started()
        return self._spooling

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def destination(self, job_type: str, priority: Priority = "normal") -> str:
        """Where jobs of `job_type` go: the topic (Kafka, memory) or subject (NATS), at
        `priority` (`ValueError` as `publish`)."""
        return self._settings.routing.destination(self._publisher.transport, job_type, priority)

    async def publish(
        self,
        job: Job,
        *,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        subject: str | None = None,
        delay: float | timedelta | None = None,
        priority: Priority = "normal",
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> Receipt:
        """Publish one job; returns when the broker acknowledged it. `delay` (seconds or a
        `timedelta`) is a shorthand for `not_before=now + delay` (`ValueError` with both).
        `priority`: `high`, `normal` or `low` (`ValueError` for a level other than `normal`
        unless `routing.priorities`). The options are `PublishRequest`'s fields.

        `unique_key` with `unique_for` (seconds or a `timedelta`): while a job published
        with the key is inside its window, return that job's receipt (`duplicate=True`)
        and publish nothing (docs/scheduling.md, "Unique jobs"; needs `unique.url`)."""
        request = PublishRequest(
            job,
            key,
            id,
            idempotency_key,
            not_before,
            subject,
            delay,
            priority,
            unique_key,
            unique_for,
        )
        if unique_key is not None or unique_for is not None:
            return await self._publish_unique(request)
        origin = current_trace_headers()
        job_type = getattr(type(job), "job_type", None)
        if job_type is None or not self._traced():  # (`encode` rejects a non-concrete type)
            destination, message = self._encode(request, origin, origin)
            return await self._send(destination, message)
        destination = self._destination(str(job_type), priority)
        with self._tracer.start_as_current_span(
            f"send {destination}",
            kind=SpanKind.PRODUCER,
            attributes=self._span_attributes(destination, "send"),
        ) as span:
            _, message = self._encode(request, current_trace_headers(), origin)
            _describe_job(span, message)
            receipt = await self._send(destination, message)
            _describe_receipt(span, receipt)
            return receipt

    async def publish_many(self, jobs: Iterable[Job | PublishRequest]) -> list[Receipt]:
        """Publish many jobs, pipelined; receipts in input order. A request with a
        `unique_key` is claimed first (one store round trip each, in input order); a
        duplicate gets the key's earlier receipt in its place and is not sent."""
        origin = current_trace_headers()  # one origin for the whole call
        traced = self._traced()
        receipts: list[Receipt] = []
        batch: list[tuple[str, JobMessage]] = []
        held: HeldClaims | None = None  # the unique keys of this chunk, if any
        chunk: HeldClaims | None
        try:
            for item in jobs:
                # A plain job is published with the default options, without a request.
                entry: Job | PublishRequest = item
                if isinstance(item, PublishRequest) and (
                    item.unique_key is not None or item.unique_for is not None
                ):
                    request = item
                    if held is not None and request.unique_key in held.keys:
                        chunk, held, sending, batch = held, None, batch, []
                        receipts += await self._send_held(sending, chunk)  # it holds the key
                    held = held or HeldClaims()
                    claimed = await self._claim(request)
                    held.add(claimed, len(batch))
                    if isinstance(claimed, Receipt):
                        continue
                    entry = dataclasses.replace(
                        request, id=claimed.job_id, unique_key=None, unique_for=None
                    )
                if traced:
                    batch.append(self._create(entry, origin))
                else:
                    batch.append(self._encode(entry, origin, origin))
                if len(batch) >= MAX_BATCH:
                    chunk, held, sending, batch = held, None, batch, []
                    receipts += await self._send_held(sending, chunk)
        except Exception:
            if held is not None and self._unique is not None:
                await self._unique.abandon_held(held)
            raise
        if batch or held is not None or not receipts:
            receipts += await self._send_held(batch, held)
        return receipts

    async def _send_held(
        self, batch: list[tuple[str, JobMessage]], held: HeldClaims | None
    ) -> list[Receipt]:
        """`_send_batch`, then settle the chunk's unique keys (ending their leases if it
        fails: the batch may be partly stored, so each keeps its job id)."""
        if held is None or self._unique is None:
            return await self._send_batch(batch)
        try:
            sent = await self._send_batch(batch)
        except Exception:
            await self._unique.abandon_held(held)
            raise
        await self._unique.settle_held(held, sent)
        return held.receipts(sent)

    async def _publish_unique(self, request: PublishRequest) -> Receipt:
        """`publish` with a unique key: claim it, publish under its job id, settle it. A
        cancelled publish (a `SyncJobProducer` timeout) leaves the key to its lease."""
        claimed = await self._claim(request)
        if isinstance(claimed, Receipt):
            return claimed
        unique = self._unique
        assert unique is not None
        try:
            receipt = await self.publish(
                request.job,
                key=request.key,
                id=claimed.job_id,
                idempotency_key=request.idempotency_key,
                not_before=request.not_before,
                subject=request.subject,
                delay=request.delay,
                priority=request.priority,
            )
        except Exception as error:
            await unique.failed(claimed, error)
            raise
        await unique.published(claimed, receipt)
        return receipt

    def check(self, request: PublishRequest) -> None:
        """Raise the `ValueError` that publishing `request` would raise before anything is
        sent or claimed: a bad `delay`, a `priority` the routing does not allow, a bad
        `unique_key` or `unique_for`, or a unique key without a store (`unique.url`). For
        callers that validate a whole batch first (the CLI)."""
        due(request)
        job_type = getattr(type(request.job), "job_type", None)
        if job_type is not None:
            self.destination(str(job_type), request.priority)
        if request.unique_key is None and request.unique_for is None:
            return
        unique_window(request, self._settings.unique.max_for_s)
        if self._unique is None:
            msg = (
                "unique_key needs the shared store of unique keys: set unique.url "
                "(JOBSTREAM_UNIQUE__URL), e.g. redis://127.0.0.1:6379/0"
            )
            raise ValueError(msg)

    async def _claim(self, request: PublishRequest) -> Reservation | Receipt:
        """Validate a unique request, then hold its key (or get the key's receipt)."""
        self.check(request)  # raises before the key is held
        key, window_s = unique_window(request, self._settings.unique.max_for_s)
        self._check_started()
        assert self._unique is not None  # checked
        job_id = request.id if request.id is not None else str(uuid.uuid4())
        return await self._unique.reserve(key, job_id, window_s)

    async def publish_data(
        self,
        job_type: str,
        data: Mapping[str, Any] | str | bytes,
        version: int | None = None,
        **options: Any,
    ) -> Receipt:
        """Validate `data` (a mapping or JSON text) against the registered model of
        `job_type` (the latest version unless `version`), then publish it. Raises
        `UnknownJobType`, `UnsupportedVersion`, `UndecodableBody` or `InvalidPayload`
        before anything is sent. `options` are `publish`'s keywords."""
        return await self.publish(self.validate(job_type, data, version), **options)

    def validate(
        self, job_type: str, data: Mapping[str, Any] | str | bytes, version: int | None = None
    ) -> Job:
        """`data` as an instance of the registered model (see `publish_data`)."""
        registry = self._registry
        model = (
            registry.latest(job_type) if version is None else registry.resolve(job_type, version)
        )
        return validate_payload(model, data)

    async def ensure(self, job_types: Iterable[str]) -> list[str]:
        """Create the topics or stream that `job_types` need; returns what was created."""
        routing = self._settings.routing
        wanted = [d for t in job_types for d in routing.level_destinations(self.destination(t))]
        return await self._publisher.ensure(wanted)

    def _traced(self) -> bool:
        """Whether an SDK records spans here: without one, per-job spans would only cost
        time (the caller's context then travels as each job's trace context)."""
        return otel.recording_provider(self._tracer_provider)

    def _create(
        self, request: Job | PublishRequest, origin: TraceHeaders
    ) -> tuple[str, JobMessage]:
        """Encode one job of a batch under its own `create` span (its creation context)."""
        job, priority = _job_and_priority(request)
        job_type = getattr(type(job), "job_type", None)
        if job_type is None:
            return self._encode(request, origin, origin)  # raises: not a concrete job type
        destination = self._destination(str(job_type), priority)
        span = self._tracer.start_span(
            f"create {destination}",
            kind=SpanKind.PRODUCER,
            attributes=self._span_attributes(destination, "create"),
        )
        try:
            created = self._encode(request, traceparent_of(span.get_span_context()), origin)
            _describe_job(span, created[1])
        finally:
            span.end()
        return created

    def _span_attributes(self, destination: str, operation: str) -> dict[str, str]:
        return {
            otel.SYSTEM: self._publisher.transport,
            otel.OPERATION_NAME: operation,
            otel.OPERATION_TYPE: operation,
            otel.DESTINATION: destination,
        }

    def _destination(self, job_type: str, priority: Priority) -> str:
        """`destination`, remembered per (job type, priority): the routing settings are
        frozen, and publishing asks for every job."""
        try:
            return self._destinations[job_type, priority]
        except KeyError:
            destination = self.destination(job_type, priority)  # raises: not remembered
            self._destinations[job_type, priority] = destination
            return destination

    def _encode(
        self, request: Job | PublishRequest, trace: TraceHeaders, origin: TraceHeaders
    ) -> tuple[str, JobMessage]:
        # The origin is the caller's context; without one, the publish itself.
        if origin[0] is None:
            origin = trace
        if not isinstance(request, PublishRequest):  # a plain job: the default options
            message = encode(
                request,
                source=self._settings.source,
                traceparent=trace[0],
                tracestate=trace[1],
                origin_traceparent=origin[0],
                origin_tracestate=origin[1],
            )
            return self._destination(message.attributes.type, "normal"), message
        message = encode_request(request, self._settings.source, trace, origin)
        return self._destination(message.attributes.type, request.priority), message

    async def _send_batch(self, batch: list[tuple[str, JobMessage]]) -> list[Receipt]:
        if not batch:
            self._check_started()
            return []
        destinations = list(dict.fromkeys(d for d, _ in batch))
        name = f"send {destinations[0]}" if len(destinations) == 1 else "send"
        attributes = self._span_attributes(destinations[0], "send")
        if len(destinations) > 1:
            del attributes[otel.DESTINATION]
        if not self._traced():
            return await self._send_many(destinations, batch)
        with self._tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes={**attributes, otel.BATCH_COUNT: len(batch)}
        ):
            return await self._send_many(destinations, batch)

    async def _send(self, destination: str, message: JobMessage) -> Receipt:
        self._check_started()
        try:
            if self._spooling is not None:
                return await self._spooling.send(destination, message)
            await self._ensure_missing([destination])
            return await self._publisher.send(destination, message)
        except PublishError as error:
            error.job_id = message.attributes.id  # an ambiguous timeout keeps its job id
            raise

    async def _send_many(
        self, destinations: list[str], batch: list[tuple[str, JobMessage]]
    ) -> list[Receipt]:
        self._check_started()
        if self._spooling is not None:
            return await self._spooling.send_many(batch)
        await self._ensure_missing(destinations)
        return await self._publisher.send_many(batch)

    async def _ensure_missing(self, destinations: list[str]) -> None:
        """With `create_missing`: create each destination once, before its first publish."""
        if self._settings.create_missing:
            missing = [d for d in destinations if d not in self._ensured]
            if missing:
                await self._publisher.ensure(missing)
                self._ensured.update(missing)

    def _check_started(self) -> None:
        if not self._started:
            msg = "JobProducer is not started: use `async with JobProducer(...)` or await start()"
            raise RuntimeError(msg)


def _job_and_priority(request: Job | PublishRequest) -> tuple[Job, Priority]:
    if isinstance(request, PublishRequest):
        return request.job, request.priority
    return request, "normal"


def _describe_job(span: Span, message: JobMessage) -> None:
    if span.is_recording():
        attributes = message.attributes
        described: dict[str, str | int] = {
            otel.MESSAGE_ID: attributes.id,
            otel.JOB_ID: attributes.id,
            otel.JOB_TYPE: attributes.type,
            otel.JOB_VERSION: attributes.version,
            otel.JOB_ATTEMPT: attributes.attempt,
        }
        span.set_attributes(described)
        if attributes.key is not None:
            span.set_attribute(otel.KAFKA_KEY, attributes.key)


def _describe_receipt(span: Span, receipt: Receipt) -> None:
    if span.is_recording() and receipt.partition is not None:
        span.set_attribute(otel.PARTITION, str(receipt.partition))
        if receipt.transport == "kafka":
            span.set_attribute(otel.KAFKA_OFFSET, receipt.offset)
