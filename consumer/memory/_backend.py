"""`MemoryBackend`: the worker's backend on a `MemoryBroker`, shaped exactly as Kafka's.

Retries are records in the retry tier topics (`settings.retry`), failures go to the
`<topic>.dlq` topic through the runtime's `RecordFailureRouter` (a priority level's topic
shares its normal topic's tiers and dead-letter topic), provisioning creates the
same topics as on Kafka (partition count `routing.partitions`), and replays are recorded
in the ledger topic `retry.replay_ledger_topic`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

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
    main_destinations,
)
from consumer.memory._dead_letters import list_dead_letters, replay
from consumer.memory._source import MemorySource, SettleListener
from consumer.runtime import RecordFailureRouter, normal_topics
from consumer.stores import IdempotencyStore
from producer import Publisher, plan_destinations
from producer.memory import MemoryBroker, MemoryPublisher

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """`consumer.Backend` on one `MemoryBroker`: pass the broker to share it between
    workers, producers and the test (`consumer.memory.BACKEND` has one per process)."""

    features = Features(
        name="memory",
        separate_processes=False,
        retries="records",
        key_order="always",
        replay_ledger="topic retry.replay_ledger_topic in the memory broker",
    )

    def __init__(
        self, broker: MemoryBroker | None = None, *, on_settle: SettleListener | None = None
    ) -> None:
        """`broker`: where the topics live (default: a new one). `on_settle`: told of every
        delivery a source of this backend settles, with its outcome."""
        self.broker = broker if broker is not None else MemoryBroker()
        self._on_settle = on_settle

    async def open(
        self, app: App, settings: Settings, stack: contextlib.AsyncExitStack, tracer: Tracer | None
    ) -> tuple[Source, FailureRouter]:
        """A `MemorySource` and the record router. The main, tier and dead-letter topics
        are created with `create_missing`, else `DestinationMissing` names the missing."""
        publisher = MemoryPublisher(self.broker, partitions=settings.routing.partitions)
        topics = main_destinations(app, settings)
        needed = [*topics, *settings.retry.failure_topics(normal_topics(topics))]
        if settings.create_missing:
            await publisher.ensure(needed)
        else:
            await publisher.check(needed)
        source = MemorySource(self.broker, settings, topics, on_settle=self._on_settle)
        return source, RecordFailureRouter(settings, publisher, tracer, system="memory")

    def publisher(self, settings: Settings) -> Publisher:
        return MemoryPublisher(self.broker, partitions=settings.routing.partitions)

    async def open_idempotency_store(self, settings: Settings) -> IdempotencyStore:
        msg = "the memory broker keeps no idempotency store: use memory, redis or postgres"
        raise ValueError(msg)

    async def provision(self, settings: Settings, job_types: Sequence[str]) -> list[str]:
        def hook(job_type: str, main: str) -> list[str]:
            return settings.retry.failure_topics([main])

        topics = plan_destinations(settings, job_types, [hook])
        partitions = settings.routing.partitions
        created = {topic for topic in topics if self.broker.create_topic(topic, partitions)}
        ledger = settings.retry.replay_ledger_topic
        self.broker.create_topic(ledger, 1)
        lines = [f"memory topic {t}: {'created' if t in created else 'exists'}" for t in topics]
        return [*lines, f"memory topic {ledger}: ready"]

    def dead_letter_destinations(self, settings: Settings, job_types: Iterable[str]) -> list[str]:
        mains = {settings.routing.topic(job_type) for job_type in job_types}
        return sorted(settings.retry.dead_letter_topic(topic) for topic in mains)

    async def find_dead_letters(
        self, settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
    ) -> list[DeadLetterRecord]:
        return list_dead_letters(self.broker, destinations, where)

    async def replay(
        self,
        settings: Settings,
        records: Iterable[DeadLetterRecord],
        *,
        force: bool = False,
        dry_run: bool = False,
        rate_per_s: float = 50.0,
    ) -> list[ReplayResult]:
        return await replay(
            self.broker, settings, records, force=force, dry_run=dry_run, rate_per_s=rate_per_s
        )
