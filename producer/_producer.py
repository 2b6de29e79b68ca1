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
"""

from __future__ import annotations

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
from producer._request import PublishRequest, due
from producer._settings import ProducerSettings
from producer._spool_status import SpoolStatus
from producer._spooling import SpoolingSender
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
    ) -> None:
        """`settings` default to `ProducerSettings()` (environment and config file).
        `publisher` replaces the one `settings.transport` selects (e.g. a `MemoryPublisher`
        on a broker the test reads). `registry` resolves job types for `publish_data`.
        `tracer_provider` records the publish spans (default: the global one)."""
        self._settings = settings if settings is not None else ProducerSettings()
        self._publisher = publisher if publisher is not None else make_publisher(self._settings)
        self._registry = registry if registry is not None else default_registry
        self._started = False
        self._ensured: set[str] = set()
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self._tracer_provider = provider
        self._tracer: Tracer = provider.get_tracer("jobstream.producer")
        spool = self._settings.spool
        self._spooling = (
            SpoolingSender(self._publisher, spool, self._ensure_missing)
            if spool.path is not None
            else None
        )

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

    def destination(self, job_type: str) -> str:
        """Where jobs of `job_type` go: the topic (Kafka, memory) or subject (NATS)."""
        return self._settings.routing.destination(self._publisher.transport, job_type)

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
    ) -> Receipt:
        """Publish one job; returns when the broker acknowledged it. `delay` (seconds or a
        `timedelta`) is a shorthand for `not_before=now + delay` (`ValueError` with both)."""
        request = PublishRequest(job, key, id, idempotency_key, not_before, subject, delay)
        origin = current_trace_headers()
        job_type = getattr(type(job), "job_type", None)
        if job_type is None or not self._traced():  # (`encode` rejects a non-concrete type)
            destination, message = self._encode(request, origin, origin)
            return await self._send(destination, message)
        destination = self.destination(str(job_type))
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
        """Publish many jobs, pipelined; receipts in input order."""
        origin = current_trace_headers()  # one origin for the whole call
        traced = self._traced()
        receipts: list[Receipt] = []
        batch: list[tuple[str, JobMessage]] = []
        for item in jobs:
            request = item if isinstance(item, PublishRequest) else PublishRequest(item)
            if traced:
                batch.append(self._create(request, origin))
            else:
                batch.append(self._encode(request, origin, origin))
            if len(batch) >= MAX_BATCH:
                receipts += await self._send_batch(batch)
                batch = []
        if batch or not receipts:
            receipts += await self._send_batch(batch)
        return receipts

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
        return await self._publisher.ensure([self.destination(t) for t in job_types])

    def _traced(self) -> bool:
        """Whether an SDK records spans here: without one, per-job spans would only cost
        time (the caller's context then travels as each job's trace context)."""
        return otel.recording_provider(self._tracer_provider)

    def _create(self, request: PublishRequest, origin: TraceHeaders) -> tuple[str, JobMessage]:
        """Encode one job of a batch under its own `create` span (its creation context)."""
        job_type = getattr(type(request.job), "job_type", None)
        if job_type is None:
            return self._encode(request, origin, origin)  # raises: not a concrete job type
        destination = self.destination(str(job_type))
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

    def _encode(
        self, request: PublishRequest, trace: TraceHeaders, origin: TraceHeaders
    ) -> tuple[str, JobMessage]:
        # The origin is the caller's context; without one, the publish itself.
        if origin[0] is None:
            origin = trace
        message = encode(
            request.job,
            source=self._settings.source,
            id=request.id,
            key=request.key,
            idempotency_key=request.idempotency_key,
            not_before=due(request),
            subject=request.subject,
            traceparent=trace[0],
            tracestate=trace[1],
            origin_traceparent=origin[0],
            origin_tracestate=origin[1],
        )
        return self.destination(message.attributes.type), message

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
