"""`SyncJobProducer`: `JobProducer` for code that is not async (Django, Flask, scripts).

    producer = SyncJobProducer()                  # once, at import or app start; cheap
    receipt = producer.publish(SendWelcomeEmail(...), key="user-42")   # blocks until acked

It runs one `JobProducer` on an event loop in a daemon thread of its own and hands each call
to it (`asyncio.run_coroutine_threadsafe`), so it keeps every promise of the async producer:
a returned `Receipt` means the broker acknowledged the job (or, with a spool configured,
that it is in the durable spool); a failure raises the same `PublishError` subclasses.

- Thread-safe: any number of threads may publish at once; their publishes are pipelined
  on the one connection.
- Started on first use (or by `start()` / `with`): threads calling meanwhile share that
  one connect attempt. Stopped by `stop()`, `with`, or at interpreter exit, which waits
  for jobs already handed over (bounded; it never raises).
- Fork-safe: a process forked after first use (gunicorn, uWSGI, multiprocessing), even
  while another thread connects, gets a fresh lock, loop, thread and connection on its
  first publish; the parent's are not touched.
- The caller's OpenTelemetry context (the current span of the request being served) is
  carried into the loop, so each job's origin is the caller's trace, as with `publish`.
- Every wait is bounded: a call waits at most `call_timeout_s` (default: the transport's
  connect timeout plus its publish timeout plus 5 s), a lazy connect included (one that
  does not end in time is `BrokerUnavailable`). Past it a publish raises `PublishTimeout`,
  whose `job_id` is the id the job was (maybe) stored under: publish again with that id
  to be sure (repeats are deduplicated by id).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.trace import TracerProvider

from producer._errors import BrokerUnavailable, PublishTimeout
from producer._producer import JobProducer
from producer._publisher import Publisher, Receipt
from producer._request import PublishRequest
from producer._settings import Priority, ProducerSettings
from producer._spool_status import SpoolStatus
from schemas import Job, JobRegistry, default_registry, validate_payload

__all__ = ["SyncJobProducer"]

_T = TypeVar("_T")

log = logging.getLogger("jobstream.producer")


class _Loop:
    """One event loop in a daemon thread, the producer on it, and its start."""

    def __init__(self, producer: JobProducer) -> None:
        self.pid = os.getpid()
        self.producer = producer
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="jobstream-producer", daemon=True
        )
        self._thread.start()
        self.started = self.submit(producer.start())
        """Done once the producer connected (or failed to); every caller waits on it."""

    def submit(self, work: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        caller = otel_context.get_current()

        async def in_caller_context() -> _T:
            token = otel_context.attach(caller)  # the task's own context copy: scoped to it
            try:
                return await work
            finally:
                otel_context.detach(token)

        return asyncio.run_coroutine_threadsafe(in_caller_context(), self.loop)

    def close(self, timeout_s: float) -> None:
        """Stop the producer (waiting for what it was handed, `timeout_s` at most), then
        end the thread. Past the bound the producer's tasks are cancelled: a spool keeps
        what it holds on disk."""
        try:
            self.submit(self.producer.stop()).result(timeout_s)
        except TimeoutError:
            log.warning(
                "the producer did not stop within %.1fs; its tasks are cancelled", timeout_s
            )
        except Exception:
            log.warning("stopping the producer failed", exc_info=True)
        finally:
            self.end(timeout_s)

    def end(self, timeout_s: float) -> None:
        """Cancel what still runs on the loop (bounded), stop it and join the thread."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop).result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_others() -> None:
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class SyncJobProducer:
    """Publishes jobs from synchronous code; a context manager that connects on enter.

    Takes the same arguments as `JobProducer` (`publisher`, when given, is used by the
    first process only: a forked child builds its own from `settings`), plus
    `call_timeout_s`, the longest any call blocks (see the module docstring)."""

    def __init__(
        self,
        settings: ProducerSettings | None = None,
        *,
        publisher: Publisher | None = None,
        registry: JobRegistry | None = None,
        tracer_provider: TracerProvider | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        self._settings = settings if settings is not None else ProducerSettings()
        self._publisher = publisher
        self._registry = registry
        self._tracer_provider = tracer_provider
        self._call_timeout_s = call_timeout_s or _default_timeout(self._settings)
        self._lock = threading.Lock()
        self._running: _Loop | None = None
        self._forked = False
        # A fork copies this lock in whatever state another thread held it: the child
        # gets a fresh one, and builds its own loop on first use.
        own = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(own))

    @property
    def settings(self) -> ProducerSettings:
        return self._settings

    def start(self) -> None:
        """Connect now (otherwise the first publish does). Raises `BrokerUnavailable` if the
        broker cannot be reached within the connect timeout. Idempotent."""
        self._loop()

    def stop(self) -> None:
        """Wait for jobs already handed over, then disconnect and end the thread; with a
        spool, drain it for up to `spool.stop_drain_s` first (the rest stays on disk).
        Bounded by `call_timeout_s` plus that; never raises. Idempotent; a later publish
        starts again."""
        with self._lock:
            running, self._running = self._running, None
        if running is not None and running.pid == os.getpid():
            atexit.unregister(self.stop)
            spool = self._settings.spool
            drain_s = spool.stop_drain_s if spool.path is not None else 0.0
            running.close(self._call_timeout_s + drain_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def destination(self, job_type: str) -> str:
        """Where jobs of `job_type` go: the topic (Kafka, memory) or subject (NATS)."""
        return self._settings.destination(job_type)

    def publish(
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
        """Publish one job; returns when the broker acknowledged it (`JobProducer.publish`).
        With a `unique_key`, a `PublishTimeout` of this call's own bound carries the id it
        proposed, not necessarily the key's: publish again with the same `unique_key`."""
        job_id = id if id is not None else str(uuid.uuid4())
        request = PublishRequest(
            job,
            key,
            job_id,
            idempotency_key,
            not_before,
            subject,
            delay,
            priority,
            unique_key,
            unique_for,
        )
        return self._call(
            lambda p: p.publish(
                job,
                key=request.key,
                id=request.id,
                idempotency_key=request.idempotency_key,
                not_before=request.not_before,
                subject=request.subject,
                delay=request.delay,
                priority=request.priority,
                unique_key=request.unique_key,
                unique_for=request.unique_for,
            ),
            job_id,
            self.destination(str(getattr(type(job), "job_type", "?"))),
        )

    def publish_many(self, jobs: Iterable[Job | PublishRequest]) -> list[Receipt]:
        """Publish many jobs, pipelined; receipts in input order (`JobProducer.publish_many`).
        Give each `PublishRequest` an `id` to be able to publish them again after a
        `PublishTimeout`."""
        items = list(jobs)
        return self._call(lambda p: p.publish_many(items), None, "many destinations")

    def publish_data(
        self,
        job_type: str,
        data: Mapping[str, Any] | str | bytes,
        version: int | None = None,
        **options: Any,
    ) -> Receipt:
        """Validate `data` against the registered model of `job_type`, then publish it;
        raises `InvalidPayload` (and the other errors of `JobProducer.publish_data`)
        before anything is sent. `options` are `publish`'s keywords."""
        return self.publish(self.validate(job_type, data, version), **options)

    def spool_status(self) -> SpoolStatus:
        """What the spool holds now (`JobProducer.spool_status`)."""
        return self._call(lambda p: p.spool_status(), None, "the spool")

    def flush_spool(self) -> int:
        """Publish every spooled job now (`JobProducer.flush_spool`)."""
        return self._call(lambda p: p.flush_spool(), None, "the spool")

    def validate(
        self, job_type: str, data: Mapping[str, Any] | str | bytes, version: int | None = None
    ) -> Job:
        """`data` as an instance of the registered model (no I/O, no thread)."""
        registry = self._registry if self._registry is not None else default_registry
        model = (
            registry.latest(job_type) if version is None else registry.resolve(job_type, version)
        )
        return validate_payload(model, data)

    def _call(
        self,
        work: Callable[[JobProducer], Coroutine[Any, Any, _T]],
        job_id: str | None,
        destination: str,
    ) -> _T:
        deadline = time.monotonic() + self._call_timeout_s
        running = self._loop(deadline)
        future = running.submit(work(running.producer))
        try:
            return future.result(max(deadline - time.monotonic(), 0.0))
        except (TimeoutError, concurrent.futures.CancelledError):
            # Out of time, or cut off by `stop()`: the job may or may not be stored, so
            # the error keeps its id.
            future.cancel()
            error = PublishTimeout(self._settings.transport, destination, self._call_timeout_s)
            error.job_id = job_id
            raise error from None

    def _loop(self, deadline: float | None = None) -> _Loop:
        """The started loop of this process; the first caller builds it, every caller
        waits for the same start (until `deadline`), none holds the lock while waiting."""
        if deadline is None:
            deadline = time.monotonic() + self._call_timeout_s
        with self._lock:
            running = self._running
            if running is None or running.pid != os.getpid():
                running = self._running = self._new_loop()
        try:
            running.started.result(max(deadline - time.monotonic(), 0.0))
        except BaseException as error:
            self._discard(running)
            if isinstance(error, TimeoutError | concurrent.futures.CancelledError):
                detail = f"no connection within the call timeout of {self._call_timeout_s:g}s"
                raise BrokerUnavailable(
                    self._settings.transport, _address(self._settings), detail
                ) from None
            raise
        return running

    def _new_loop(self) -> _Loop:
        producer = JobProducer(
            self._settings,
            publisher=None if self._forked else self._publisher,
            registry=self._registry,
            tracer_provider=self._tracer_provider,
        )
        if not self._forked:
            atexit.unregister(self.stop)
            atexit.register(self.stop)
        return _Loop(producer)

    def _discard(self, running: _Loop) -> None:
        """Forget a loop whose start failed (once), and end it."""
        with self._lock:
            if self._running is not running:
                return
            self._running = None
        running.started.cancel()
        running.end(self._call_timeout_s)


def _after_fork(own: weakref.ref[SyncJobProducer]) -> None:
    producer = own()
    if producer is not None:
        producer._lock = threading.Lock()
        producer._forked = producer._forked or producer._running is not None
        producer._running = None


def _address(settings: ProducerSettings) -> str:
    if settings.transport == "nats":
        return ",".join(settings.nats.servers)
    return settings.kafka.bootstrap_servers if settings.transport == "kafka" else "memory"


def _default_timeout(settings: ProducerSettings) -> float:
    broker = settings.nats if settings.transport == "nats" else settings.kafka
    return broker.connect_timeout_s + broker.publish_timeout_s + 5.0
