"""The one place where the worker chooses its backend, and what a backend must offer.

`settings.transport` names a package (`consumer.kafka`, `consumer.nats`,
`consumer.memory`); it is imported here, on first use, and nowhere else in the consumer,
so the runtime never imports a broker client and a Kafka worker never imports nats-py.
Each package exposes `BACKEND`, an object with the `Backend` shape. (The producer chooses
its publisher the same way in `producer/_backends.py`.)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Sequence
from typing import Protocol, cast

from opentelemetry.trace import Tracer

from consumer.core import (
    App,
    DeadLetterFilter,
    DeadLetterRecord,
    FailureRouter,
    Features,
    ReplayResult,
    Settings,
    Source,
)
from consumer.stores import IdempotencyStore, open_store
from producer import Publisher

__all__ = ["Backend", "backend_for", "open_idempotency_store"]


class Backend(Protocol):
    """Everything broker-specific the worker, `jobstream topics` and `jobstream dlq` need."""

    @property
    def features(self) -> Features:
        """What this backend can do (the contract suite reads it)."""
        ...

    async def open(
        self, app: App, settings: Settings, stack: contextlib.AsyncExitStack, tracer: Tracer | None
    ) -> tuple[Source, FailureRouter]:
        """A source for `app`'s destinations and the router of its failures, connected
        (retrying an unreachable broker for `worker.broker_wait_s`, then `WorkerError`);
        their clean-up is pushed on `stack`. `tracer` records hand-off spans (or None)."""
        ...

    def publisher(self, settings: Settings) -> Publisher:
        """A publisher to this broker, not started (the cron ticks' producer uses it)."""
        ...

    async def open_idempotency_store(self, settings: Settings) -> IdempotencyStore:
        """The idempotency store the broker itself keeps (NATS: a KV bucket); `ValueError`
        where the broker keeps none."""
        ...

    async def provision(self, settings: Settings, job_types: Sequence[str]) -> list[str]:
        """Create what the job types need (topics, streams, consumers, buckets, ledgers);
        one report line each, for `jobstream topics ensure`."""
        ...

    def dead_letter_destinations(self, settings: Settings, job_types: Iterable[str]) -> list[str]:
        """Where the dead letters of `job_types` are (topics, or JetStream subjects)."""
        ...

    async def find_dead_letters(
        self, settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
    ) -> list[DeadLetterRecord]:
        """The dead letters in `destinations` that match `where`, oldest first."""
        ...

    async def replay(
        self,
        settings: Settings,
        records: Iterable[DeadLetterRecord],
        *,
        force: bool = False,
        dry_run: bool = False,
        rate_per_s: float = 50.0,
    ) -> list[ReplayResult]:
        """Republish `records` to their main destinations, once each unless `force`."""
        ...


def backend_for(transport: str) -> Backend:
    """The backend package `transport` names, imported now (`ValueError` if none does)."""
    if transport not in ("kafka", "nats", "memory"):
        msg = f"transport {transport!r} has no worker backend: use kafka, nats or memory"
        raise ValueError(msg)
    return cast("Backend", importlib.import_module(f"consumer.{transport}").BACKEND)


async def open_idempotency_store(
    settings: Settings, *, max_connections: int = 8
) -> IdempotencyStore:
    """The store `idempotency.backend` names: memory, Redis and PostgreSQL from
    `consumer.stores`; `nats-kv` from the NATS backend (whatever the transport)."""
    if settings.idempotency.backend == "nats-kv":
        return await backend_for("nats").open_idempotency_store(settings)
    return await open_store(settings.idempotency, max_connections=max_connections)
