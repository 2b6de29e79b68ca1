"""Assemble and run a worker from settings: source, health endpoint, signals.

`run_worker` is what `jobstream worker MODULE:APP` calls. SIGTERM or SIGINT starts a
graceful drain; a second signal exits at once (non-zero, nothing more is committed).
Telemetry comes from the OTEL_* variables (`consumer/_telemetry.py`); the health server
also serves `/metrics` in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

from consumer._app import App
from consumer._health import HealthServer
from consumer._idempotency import IdempotencyStore, open_store
from consumer._routing import KafkaFailureRouter
from consumer._settings import Settings
from consumer._source import Source
from consumer._status import StatusStore, open_status_store
from consumer._step_failure import FailureRouter
from consumer._telemetry import Telemetry, configure
from consumer._worker import Worker
from producer import KafkaPublisher, NatsPublisher

log = logging.getLogger("jobstream.worker")


def topics_for(app: App, settings: Settings) -> list[str]:
    types = settings.worker.subscribe_types or app.job_types()
    return sorted({settings.routing.topic(job_type) for job_type in types})


def subjects_for(app: App, settings: Settings) -> list[str]:
    types = settings.worker.subscribe_types or app.job_types()
    return sorted({settings.routing.subject(job_type) for job_type in types})


def build_source(app: App, settings: Settings) -> Source:
    if settings.transport == "kafka":
        from consumer._kafka_source import KafkaSource  # noqa: PLC0415

        return KafkaSource(settings, topics_for(app, settings))
    if settings.transport == "nats":
        from consumer._nats_source import NatsSource  # noqa: PLC0415

        return NatsSource(settings, subjects_for(app, settings))
    msg = (
        f"transport {settings.transport!r} has no worker source: "
        "use JOBSTREAM_TRANSPORT=kafka or nats"
    )
    raise NotImplementedError(msg)


async def open_status(settings: Settings) -> StatusStore | None:
    """The configured status store, connected (None when `status.backend` is `none`)."""
    status = settings.status
    url = status.url.get_secret_value() if status.url else None
    return await open_status_store(status.backend, url, status.namespace, status.retention_s)


def routing_topics(app: App, settings: Settings) -> list[str]:
    """The retry tier and dead-letter topics the worker publishes failed jobs to."""
    topics: list[str] = []
    for topic in topics_for(app, settings):
        if not settings.retry.in_place:
            topics.extend(settings.retry.tier_topics(topic))
        topics.append(settings.retry.dead_letter_topic(topic))
    return topics


async def _failure_router(
    app: App, settings: Settings, stack: contextlib.AsyncExitStack, telemetry: Telemetry
) -> FailureRouter:
    publisher = KafkaPublisher(settings.kafka, settings.routing)
    await publisher.start()
    stack.push_async_callback(publisher.stop)
    needed = routing_topics(app, settings)
    if settings.create_missing:
        await publisher.ensure(needed)
    else:
        await publisher.check(needed)
    tracer = telemetry.tracer("jobstream.worker") if telemetry.tracing else None
    return KafkaFailureRouter(settings, publisher, tracer)


async def _nats_failure_router(
    app: App, settings: Settings, stack: contextlib.AsyncExitStack, source: Source,
    telemetry: Telemetry,
) -> FailureRouter:  # fmt: skip
    from consumer._nats_routing import (  # noqa: PLC0415
        NatsFailureRouter,
        dead_letter_subjects,
        ensure_dead_letter_stream,
    )
    from consumer._nats_source import NatsSource, until_reachable  # noqa: PLC0415

    assert isinstance(source, NatsSource)
    publisher = NatsPublisher(settings.nats, settings.routing)
    await until_reachable(settings, publisher.start)
    stack.push_async_callback(publisher.stop)
    subjects = subjects_for(app, settings)
    if settings.create_missing:
        js = publisher.client.jetstream(timeout=settings.nats.publish_timeout_s)
        await ensure_dead_letter_stream(js, settings, subjects)
    else:
        await publisher.check(dead_letter_subjects(settings, subjects))
    tracer = telemetry.tracer("jobstream.worker") if telemetry.tracing else None
    return NatsFailureRouter(settings, publisher, source, tracer)


@contextlib.asynccontextmanager
async def open_worker(
    app: App, settings: Settings, *, telemetry: Telemetry | None = None
) -> AsyncIterator[Worker]:
    """A worker wired for `settings.transport` (source, failure routing), not yet running.
    `telemetry` defaults to what the application configured globally."""
    telemetry = telemetry if telemetry is not None else Telemetry.from_global()
    async with contextlib.AsyncExitStack() as stack:
        router = None
        if settings.transport == "kafka":
            router = await _failure_router(app, settings, stack, telemetry)
        status = await open_status(settings)
        if status is not None:
            stack.push_async_callback(status.close)
        source = build_source(app, settings)
        if settings.transport == "nats":
            router = await _nats_failure_router(app, settings, stack, source, telemetry)
        store: IdempotencyStore | None = None
        if settings.idempotency.backend == "nats-kv":  # it shares the worker's NATS settings
            store = await open_store(settings.idempotency, settings.nats)
            stack.push_async_callback(store.close)
        yield Worker(app, settings, source, router=router, status=status, store=store,
                     telemetry=telemetry)  # fmt: skip


async def run_worker(app: App, settings: Settings) -> Worker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`), drain, and return the worker."""
    telemetry = configure(f"jobstream-{app.name}")
    try:
        async with open_worker(app, settings, telemetry=telemetry) as worker:
            return await _run(worker)
    finally:
        await asyncio.to_thread(telemetry.shutdown)  # exports what is still queued


async def _run(worker: Worker) -> Worker:
    settings = worker.settings
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.error("second signal: exiting at once, in-flight jobs will be redelivered")
            os._exit(128 + signum)
        log.info(
            "signal %s: draining (up to %.0fs)",
            signal.Signals(signum).name,
            settings.worker.drain_timeout_s,
        )
        worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    health = None
    if settings.health.port:
        health = HealthServer(
            settings.health.host, settings.health.port,
            live=lambda: not worker.stopped_by_fault, ready=lambda: worker.ready,
        )  # fmt: skip
        if worker.telemetry.prometheus is not None:
            health.route("/metrics", lambda: (200, worker.telemetry.prometheus_text()))
        await health.start()
    try:
        await worker.run()
    finally:
        if health is not None:
            await health.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return worker
