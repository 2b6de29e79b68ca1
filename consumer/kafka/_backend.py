"""The Kafka backend: a consumer-group source reading the main and retry tier topics,
failure routing to tier and dead-letter topics, provisioning, and dead letters."""

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
from consumer.kafka._dead_letters import ReplayLedger, list_dead_letters, replay
from consumer.kafka._source import KafkaSource
from consumer.runtime import RecordFailureRouter, normal_topics, until_reachable
from consumer.stores import IdempotencyStore
from producer import Publisher, destination_level, plan_destinations
from producer.kafka import KafkaPublisher


class KafkaBackend:
    """`consumer._backends.Backend` for Kafka."""

    features = Features(
        name="kafka",
        separate_processes=True,
        retries="records",
        key_order="always",
        replay_ledger="compacted topic retry.replay_ledger_topic",
    )

    async def open(
        self, app: App, settings: Settings, stack: contextlib.AsyncExitStack, tracer: Tracer | None
    ) -> tuple[Source, FailureRouter]:
        publisher = KafkaPublisher(settings.kafka, settings.routing)
        await until_reachable(settings, publisher.start)
        stack.push_async_callback(publisher.stop)
        topics = main_destinations(app, settings)
        needed = settings.retry.failure_topics(normal_topics(topics))
        # A priority level's topic too (not a main topic: a missing one may come later).
        needed += [t for t in topics if destination_level(t)[1] != "normal"]
        if settings.create_missing:
            await publisher.ensure(needed)
        else:
            await publisher.check(needed)
        source = KafkaSource(settings, topics, requeue=publisher)
        return source, RecordFailureRouter(settings, publisher, tracer)

    def publisher(self, settings: Settings) -> Publisher:
        return KafkaPublisher(settings.kafka, settings.routing)

    async def open_idempotency_store(self, settings: Settings) -> IdempotencyStore:
        msg = "Kafka keeps no idempotency store: use memory, redis, postgres or nats-kv"
        raise ValueError(msg)

    async def provision(self, settings: Settings, job_types: Sequence[str]) -> list[str]:
        def hook(job_type: str, main: str) -> list[str]:
            return settings.retry.failure_topics([main])

        topics = plan_destinations(settings, job_types, [hook])
        publisher = KafkaPublisher(settings.kafka, settings.routing)
        await publisher.start()
        try:
            created = await publisher.ensure(topics)
        finally:
            await publisher.stop()
        await ReplayLedger(settings).ensure()
        return [f"kafka topic {t}: {'created' if t in created else 'exists'}" for t in topics]

    def dead_letter_destinations(self, settings: Settings, job_types: Iterable[str]) -> list[str]:
        mains = {settings.routing.topic(job_type) for job_type in job_types}
        return sorted(settings.retry.dead_letter_topic(topic) for topic in mains)

    async def find_dead_letters(
        self, settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
    ) -> list[DeadLetterRecord]:
        return await list_dead_letters(settings, destinations, where)

    async def replay(
        self,
        settings: Settings,
        records: Iterable[DeadLetterRecord],
        *,
        force: bool = False,
        dry_run: bool = False,
        rate_per_s: float = 50.0,
    ) -> list[ReplayResult]:
        return await replay(settings, records, force=force, dry_run=dry_run, rate_per_s=rate_per_s)
