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
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from consumer.core._cron import CronSchedule, JobFactory
from consumer.core._settings import Settings
from schemas import Job, JobAttributes, JobRegistry

J = TypeVar("J", bound=Job)
F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[J, "JobContext"], Awaitable[None] | None]


class CancellationSignal:
    """Set when a job should stop: cancelled by id, or the worker is shutting down.

    Readable from the event loop (`await signal.wait()`) and from handler threads
    (`signal.is_set()`), so sync and async handlers can stop cooperatively.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event = asyncio.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason
        self._flag.set()
        self._event.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler may know about the job it runs (and nothing about the broker)."""

    attributes: JobAttributes
    """The job's CloudEvents attributes (id, type, time, key, ...)."""
    logger: logging.LoggerAdapter[logging.Logger]
    """A logger whose lines carry the job id, type and attempt."""
    deadline: float
    """`time.monotonic()` value by which the job must be done (its timeout)."""
    cancellation: CancellationSignal = field(default_factory=CancellationSignal)
    """Set when the job is cancelled or the worker shuts down; stop cooperatively."""

    @property
    def job_id(self) -> str:
        return self.attributes.id

    @property
    def attempt(self) -> int:
        return self.attributes.attempt

    @property
    def key(self) -> str | None:
        return self.attributes.key

    @property
    def cancelled(self) -> bool:
        return self.cancellation.is_set()

    def remaining_s(self) -> float:
        """Seconds left before the job times out."""
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One registered handler and how it is run."""

    model: type[Job]
    func: Callable[..., Any]
    is_async: bool
    timeout_s: float | None
    cpu_bound: bool

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
        self, model: type[J], *, timeout_s: float | None = None, cpu_bound: bool = False
    ) -> Callable[[Handler[J]], Handler[J]]:
        """Register `func` for jobs of `model` (one type and version)."""

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
            self._handlers[key] = HandlerSpec(model, func, is_async, timeout_s, cpu_bound)
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


def main_destinations(app: App, settings: Settings) -> list[str]:
    """The topics (Kafka, memory) or subjects (NATS) a worker of `app` consumes: those of
    `worker.subscribe_types`, else of every job type the app has a handler for; with
    `routing.priorities`, each at every level (`<destination>.priority-high`, ...)."""
    types = settings.worker.subscribe_types or app.job_types()
    routing = settings.routing
    return sorted({d for t in types for d in routing.level_destinations(settings.destination(t))})
