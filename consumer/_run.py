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
import re
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from consumer._backends import Backend, backend_for, open_idempotency_store
from consumer.core import App, Settings, WorkerError, store_connections
from consumer.runtime import HealthServer, Worker, transactional_problem, until_reachable
from consumer.stores import IdempotencyStore, open_status, store_refused
from consumer.telemetry import Telemetry, configure
from producer import JobProducer, SpoolSettings
from producer.retrying import Backoff, retry

log = logging.getLogger("jobstream.worker")
T = TypeVar("T")
_STORE_BACKOFF = Backoff(initial_s=0.5, max_s=10.0, jitter=True)


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
    problem = transactional_problem(app, settings.idempotency.backend)
    if problem is not None:  # before any connection: the settings alone decide
        raise WorkerError(problem)
    async with contextlib.AsyncExitStack() as stack:
        tracer = telemetry.tracer("jobstream.worker") if telemetry.tracing else None
        # The stores first: a store that cannot be opened stops the worker before it
        # built a broker client it would have to close.
        status = await _until_answers(settings, "status", lambda: open_status(settings))
        if status is not None:
            stack.push_async_callback(status.close)
        store: IdempotencyStore | None = None
        if settings.idempotency.backend != "memory":
            store = await _until_answers(
                settings,
                "idempotency",
                lambda: open_idempotency_store(
                    settings, max_connections=store_connections(app, settings)
                ),
            )
            stack.push_async_callback(store.close)
        source, router = await backend.open(app, settings, stack, tracer)
        producer = None
        if app.schedules:  # the ticks' producer; a tick it cannot publish is retried
            unspooled = settings.model_copy(update={"spool": SpoolSettings()})
            publisher = backend.publisher(settings)
            producer = JobProducer(unspooled, publisher=publisher, registry=app.registry)
            await until_reachable(settings, producer.start)
            stack.push_async_callback(producer.stop)
        yield Worker(
            app,
            settings,
            source,
            router=router,
            status=status,
            store=store,
            telemetry=telemetry,
            producer=producer,
        )


async def run_worker(app: App, settings: Settings) -> Worker:
    """Run until SIGTERM/SIGINT (or `worker.stop()`), drain, and return the worker."""
    telemetry = configure(f"jobstream-{app.name}")
    built: list[Worker] = []
    try:
        # The health endpoint first: a port in use is a setting error, said at once and
        # whether or not the stores and the broker answer (it answers "not ready" meanwhile).
        health = await _start_health(settings, telemetry, built)
        try:
            async with open_worker(app, settings, telemetry=telemetry) as worker:
                built.append(worker)
                return await _run(worker)
        finally:
            if health is not None:
                await health.stop()
    finally:
        await asyncio.to_thread(telemetry.shutdown)  # exports what is still queued


async def _start_health(
    settings: Settings, telemetry: Telemetry, built: list[Worker]
) -> HealthServer | None:
    """The health endpoint of the worker `built` will hold (live, not ready, before)."""
    if not settings.health.port:
        return None

    def live() -> str | None:
        return built[0].not_live() if built else None

    def ready() -> str | None:
        return built[0].not_ready() if built else "starting: waiting for the stores and broker"

    health = HealthServer(settings.health.host, settings.health.port, live=live, ready=ready)
    if telemetry.prometheus is not None:
        health.route("/metrics", lambda: (200, telemetry.prometheus_text()))
    try:
        await health.start()
    except OSError as error:
        msg = (
            f"the health endpoint cannot listen on {settings.health.host}:"
            f"{settings.health.port}: {error.strerror or error}; set "
            "JOBSTREAM_HEALTH__PORT / --health-port to a free port (0 turns it off) "
            "and JOBSTREAM_HEALTH__HOST to an address of this host"
        )
        raise WorkerError(msg) from error
    return health


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

    # asyncio leaves SIG_DFL behind when a handler is removed; restore what was there (the
    # log setup's SIGTERM handler writes the buffered log lines before the process dies).
    found = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in found:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run()
    finally:
        for signum, handler in found.items():
            loop.remove_signal_handler(signum)
            if handler is not None:
                signal.signal(signum, handler)
    return worker


async def _until_answers(settings: Settings, store: str, connect: Callable[[], Awaitable[T]]) -> T:
    """`connect()` to the `store` store, retried with backoff for `worker.broker_wait_s` as
    the broker is; then `WorkerError`, one line naming the URL (without its password)."""
    budget = settings.worker.broker_wait_s
    url = getattr(settings, store).url
    where = f" at {_without_password(url.get_secret_value())}" if url is not None else ""

    def retried(error: Exception) -> bool:  # a bad value or a refusal is not waited out
        return not isinstance(error, ValueError | TypeError) and not store_refused(error)

    def unreachable(error: Exception, wait_s: float) -> None:
        log.warning(
            "the %s store%s did not answer (%s); retrying in %.1fs",
            store,
            where,
            _reason(error),
            wait_s,
        )

    try:
        return await retry(
            connect,
            on=retried,
            backoff=_STORE_BACKOFF,
            deadline=time.monotonic() + budget,
            on_retry=unreachable,
        )
    except Exception as error:
        variable = f"JOBSTREAM_{store.upper()}__URL"
        happened = f"did not answer within {budget:g}s" if retried(error) else "cannot be used"
        check = f"{variable} and that it runs"
        if store_refused(error):
            check = f"{store}.url (its user, CA and host) and {store}.password_file"
            happened = "refused the connection"
        msg = f"the {store} store{where} {happened}: {_reason(error)}; check {check}"
        raise WorkerError(msg) from error


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _without_password(url: str) -> str:
    """`url` with its password replaced by `***` (URLs, their `password=` query parameter,
    which libpq takes too, and libpq `key=value` strings, quoted values included)."""
    if "://" not in url:
        return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    parts = urllib.parse.urlsplit(url)
    query = re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", parts.query)
    parts = parts._replace(query=query)
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        parts = parts._replace(netloc=netloc)
    return urllib.parse.urlunsplit(parts)
