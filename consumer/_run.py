"""Assemble and run a worker from settings: backend, stores, health endpoint, signals.

`run_worker` is what `jobstream worker MODULE:APP` calls. SIGTERM or SIGINT starts a
graceful drain; a second signal exits at once (non-zero, nothing more is committed).
Telemetry comes from the OTEL_* variables (`consumer/telemetry`); the health server
also serves `/metrics` in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

from consumer._backends import Backend, backend_for, open_idempotency_store
from consumer.core import App, Settings
from consumer.runtime import HealthServer, Worker
from consumer.stores import IdempotencyStore, open_status
from consumer.telemetry import Telemetry, configure

log = logging.getLogger("jobstream.worker")


@contextlib.asynccontextmanager
async def open_worker(
    app: App,
    settings: Settings,
    *,
    telemetry: Telemetry | None = None,
    backend: Backend | None = None,
) -> AsyncIterator[Worker]:
    """A worker wired for `settings.transport` (source, failure routing, stores), not yet
    running. `telemetry` defaults to what the application configured globally; `backend`
    to the one `settings.transport` names (pass one to share an in-memory broker)."""
    telemetry = telemetry if telemetry is not None else Telemetry.from_global()
    backend = backend if backend is not None else backend_for(settings.transport)
    async with contextlib.AsyncExitStack() as stack:
        tracer = telemetry.tracer("jobstream.worker") if telemetry.tracing else None
        source, router = await backend.open(app, settings, stack, tracer)
        status = await open_status(settings)
        if status is not None:
            stack.push_async_callback(status.close)
        store: IdempotencyStore | None = None
        if settings.idempotency.backend != "memory":
            store = await open_idempotency_store(settings)
            stack.push_async_callback(store.close)
        yield Worker(
            app, settings, source, router=router, status=status, store=store, telemetry=telemetry
        )


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
            settings.health.host,
            settings.health.port,
            live=worker.not_live,
            ready=worker.not_ready,
        )
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
