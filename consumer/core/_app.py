"""The app object: which handler runs for which job type, and what a handler sees.

```python
app = App("mail")

@app.handler(SendWelcomeEmail)
async def send_welcome(job: SendWelcomeEmail, ctx: JobContext) -> None: ...
```

`@app.cron("*/5 * * * *", tz="Europe/Paris")` above `@app.handler(Model)` also publishes
that job at every tick (one replica publishes it; see `consumer/core/_cron.py`), and
`app.schedule(CronSchedule(...))` does the same for any job type.

Handlers are plain typed functions. Async handlers run on the event loop, sync handlers in
a thread pool, and `cpu_bound=True` handlers in a process pool (they must be module-level
functions and their jobs picklable). Handlers never touch offsets or acks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from consumer.core._cron import CronSchedule, JobFactory
from consumer.core._settings import Settings
from schemas import Job, JobAttributes, JobRegistry

if TYPE_CHECKING:
    from psycopg import AsyncConnection

J = TypeVar("J", bound=Job)
F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[J, "JobContext"], Awaitable[None] | None]


class CancellationSignal:
    """Set when a job should stop: cancelled by id, or the worker is shutting down.

    Readable from the event loop (`await signal.wait()`) and from handler threads
    (`signal.is_set()`), so sync and async handlers can stop cooperatively. Set on the
    event loop (the runtime does). Nothing is allocated for a signal nobody waits on (it
    is on every job's path).
    """

    __slots__ = ("_event", "_set", "reason")

    def __init__(self) -> None:
        self._set = False  # one attribute write: seen at once by a handler thread
        self._event: asyncio.Event | None = None
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


class JobContext:
    """What a handler may know about the job it runs (and nothing about the broker).

    Read-only for handlers. `logger` and the cancellation signal's event are made when
    first used, not for every job."""

    __slots__ = ("_attributes", "_cancellation", "_deadline", "_logger", "_transaction")

    def __init__(
        self,
        attributes: JobAttributes,
        logger: logging.LoggerAdapter[logging.Logger] | None = None,
        deadline: float = math.inf,
        cancellation: CancellationSignal | None = None,
    ) -> None:
        """`deadline`: the `time.monotonic()` value by which the job must be done;
        `logger`: by default `jobstream.handler` with the job's id, type and attempt."""
        self._attributes = attributes
        self._logger = logger
        self._deadline = deadline
        self._cancellation = cancellation if cancellation is not None else CancellationSignal()
        self._transaction: AsyncConnection[Any] | None = None

    def __repr__(self) -> str:
        return f"JobContext(job_id={self.job_id!r}, attempt={self.attempt})"

    @property
    def attributes(self) -> JobAttributes:
        """The job's CloudEvents attributes (id, type, time, key, ...)."""
        return self._attributes

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the job id, type and attempt."""
        if self._logger is None:
            attributes = self._attributes
            fields: dict[str, object] = {
                "job_id": attributes.id,
                "job_type": attributes.type,
                "attempt": attributes.attempt,
            }
            self._logger = logging.LoggerAdapter(_HANDLER_LOG, {"job": fields})
        return self._logger

    @property
    def deadline(self) -> float:
        """`time.monotonic()` value by which the job must be done (its timeout)."""
        return self._deadline

    @property
    def cancellation(self) -> CancellationSignal:
        """Set when the job is cancelled or the worker shuts down; stop cooperatively."""
        return self._cancellation

    @property
    def transaction(self) -> AsyncConnection[Any]:
        """The PostgreSQL connection of this run's transaction (a psycopg 3
        `AsyncConnection`, inside `BEGIN`), for handlers registered with
        `transactional=True`: write the job's effects through it. The runtime commits it
        together with the job's completion record, or rolls it back (docs/outbox.md).
        Do not commit, roll back or close it. `RuntimeError` for other handlers."""
        if self._transaction is None:
            msg = (
                "ctx.transaction is only for handlers registered with transactional=True "
                "(and the postgres idempotency store)"
            )
            raise RuntimeError(msg)
        return self._transaction

    def use_transaction(self, connection: AsyncConnection[Any] | None) -> None:
        """For the runtime: the transaction `transaction` returns (None: no more)."""
        self._transaction = connection

    def next_attempt(self, attributes: JobAttributes, deadline: float) -> JobContext:
        """The context of the job's next attempt (an in-place retry): same signal."""
        return JobContext(attributes, None, deadline, self._cancellation)

    @property
    def job_id(self) -> str:
        return self._attributes.id

    @property
    def attempt(self) -> int:
        return self._attributes.attempt

    @property
    def key(self) -> str | None:
        return self._attributes.key

    @property
    def cancelled(self) -> bool:
        return self._cancellation.is_set()

    def remaining_s(self) -> float:
        """Seconds left before the job times out."""
        return max(0.0, self._deadline - time.monotonic())


_HANDLER_LOG = logging.getLogger("jobstream.handler")


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One registered handler and how it is run."""

    model: type[Job]
    func: Callable[..., Any]
    is_async: bool
    timeout_s: float | None
    cpu_bound: bool
    transactional: bool = False
    """Run in a PostgreSQL transaction that commits with the job's completion record."""

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"


class App:
    """A set of handlers, one per (job type, version)."""

    def __init__(self, name: str = "jobstream") -> None:
        self.name = name
        self._handlers: dict[tuple[str, int], HandlerSpec] = {}
        self._schedules: dict[str, CronSchedule] = {}
        self.registry = JobRegistry()

    def handler(
        self,
        model: type[J],
        *,
        timeout_s: float | None = None,
        cpu_bound: bool = False,
        transactional: bool = False,
    ) -> Callable[[Handler[J]], Handler[J]]:
        """Register `func` for jobs of `model` (one type and version).

        `transactional=True` (async handlers, the `postgres` idempotency store): the
        handler writes through `ctx.transaction`, which commits together with the job's
        completion record, so its effect lands once (docs/outbox.md)."""

        def register(func: Handler[J]) -> Handler[J]:
            key = (model.job_type, model.job_version)
            if key in self._handlers:
                msg = (
                    f"{model.job_type} v{model.job_version} already has a handler "
                    f"({self._handlers[key].name}): one handler per job type and version"
                )
                raise ValueError(msg)
            is_async = inspect.iscoroutinefunction(func)
            if cpu_bound and is_async:
                msg = f"{func.__qualname__}: cpu_bound handlers must be plain (sync) functions"
                raise TypeError(msg)
            if transactional and not is_async:
                msg = (
                    f"{func.__qualname__}: transactional handlers must be async functions "
                    "(ctx.transaction is an async psycopg connection)"
                )
                raise TypeError(msg)
            self._handlers[key] = HandlerSpec(
                model, func, is_async, timeout_s, cpu_bound, transactional
            )
            self.registry.register(model)
            return func

        return register

    def cron(
        self,
        expression: str,
        *,
        job: JobFactory | None = None,
        tz: str = "UTC",
        name: str = "",
        catch_up: int = 0,
        key: str | None = None,
    ) -> Callable[[F], F]:
        """Publish the job of the handler below at every tick of `expression` (read in
        `tz`), once across all replicas. Goes above `@app.handler(Model)`; `job` defaults
        to `Model()` (see `CronSchedule` for the rest)."""

        def register(func: F) -> F:
            specs = [spec for spec in self._handlers.values() if spec.func is func]
            if not specs:
                msg = (
                    f"{getattr(func, '__qualname__', func)!r} is not a handler of this app: "
                    "put @app.cron(...) above @app.handler(Model)"
                )
                raise TypeError(msg)
            model = specs[0].model
            factory: JobFactory = job if job is not None else model
            self.schedule(CronSchedule(expression, factory, tz, name, catch_up, key))
            return func

        return register

    def schedule(self, schedule: CronSchedule) -> CronSchedule:
        """Add `schedule` (its job type needs no handler in this app); `ValueError` if the
        app has one of the same name."""
        if schedule.name in self._schedules:
            msg = (
                f"the app already has a cron schedule named {schedule.name!r}: "
                "give the second one a name="
            )
            raise ValueError(msg)
        self._schedules[schedule.name] = schedule
        return schedule

    @property
    def schedules(self) -> list[CronSchedule]:
        """The app's cron schedules, in the order they were added."""
        return list(self._schedules.values())

    def spec_for(self, job_type: str, version: int) -> HandlerSpec:
        return self._handlers[(job_type, version)]

    def job_types(self) -> list[str]:
        return sorted({job_type for job_type, _ in self._handlers})

    def __iter__(self) -> Iterator[HandlerSpec]:
        return iter(self._handlers.values())


STORE_CONNECTIONS = 8
"""The PostgreSQL idempotency store's pool bound for apps without transactional handlers."""


def store_connections(app: App, settings: Settings) -> int:
    """The PostgreSQL idempotency store's pool bound: with transactional handlers every job
    in flight may hold a connection for its transaction, plus 4 for claims, renewals and
    completions (a renewal starved of a connection would lose its lease)."""
    if any(spec.transactional for spec in app):
        return max(STORE_CONNECTIONS, settings.worker.max_in_flight + 4)
    return STORE_CONNECTIONS


def main_destinations(app: App, settings: Settings) -> list[str]:
    """The topics (Kafka, memory) or subjects (NATS) a worker of `app` consumes: those of
    `worker.subscribe_types`, else of every job type the app has a handler for; with
    `routing.priorities`, each at every level (`<destination>.priority-high`, ...)."""
    types = settings.worker.subscribe_types or app.job_types()
    routing = settings.routing
    return sorted({d for t in types for d in routing.level_destinations(settings.destination(t))})
