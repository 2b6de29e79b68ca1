"""The NATS JetStream backend: durable pull consumers shared by the group, retries as
delayed redeliveries (`nak`), the dead-letter stream, provisioning, the KV idempotency
store, and dead-letter listing and replay with a KV ledger."""

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
from consumer.nats._dead_letters import list_nats_dead_letters, replay_nats
from consumer.nats._first_failures import first_failure_bucket_config
from consumer.nats._kv_store import NatsKvIdempotencyStore, bucket_config, provision_bucket
from consumer.nats._provision import (
    dead_letter_subjects,
    ensure_consumers,
    ensure_dead_letter_stream,
    ensure_key_partitions,
    ensure_replay_ledger,
)
from consumer.nats._routing import NatsFailureRouter
from consumer.nats._schedules import schedule_subjects
from consumer.nats._source import NatsSource
from consumer.runtime import until_reachable
from consumer.stores import IdempotencyStore
from producer import Publisher, plan_destinations
from producer.nats import NatsPublisher, connect_nats, nats_replicas


class NatsBackend:
    """`consumer._backends.Backend` for NATS JetStream."""

    features = Features(
        name="nats",
        separate_processes=True,
        retries="redelivery",
        key_order="key-partitions",
        replay_ledger="KV bucket jetstream.replay_ledger_bucket",
    )

    async def open(
        self, app: App, settings: Settings, stack: contextlib.AsyncExitStack, tracer: Tracer | None
    ) -> tuple[Source, FailureRouter]:
        subjects = main_destinations(app, settings)
        source = NatsSource(settings, subjects)
        publisher = NatsPublisher(settings.nats, settings.routing)
        await until_reachable(settings, publisher.start)
        stack.push_async_callback(publisher.stop)
        if settings.create_missing:
            js = publisher.client.jetstream(timeout=settings.nats.publish_timeout_s)
            await ensure_dead_letter_stream(js, settings, subjects)
        else:
            await publisher.check(dead_letter_subjects(settings, subjects))
        router = NatsFailureRouter(settings, publisher, source, tracer)
        source.on_last_delivery(router.dead_letter_last_delivery)
        source.schedule_with(publisher.send_raw)
        return source, router

    def publisher(self, settings: Settings) -> Publisher:
        return NatsPublisher(settings.nats, settings.routing)

    async def open_idempotency_store(self, settings: Settings) -> IdempotencyStore:
        idempotency, nats = settings.idempotency, settings.nats
        if idempotency.url is not None:  # another server, same credentials
            nats = nats.model_copy(update={"servers": [idempotency.url.get_secret_value()]})
        return await NatsKvIdempotencyStore.connect(
            nats, idempotency.namespace, idempotency.retention_s
        )

    async def provision(self, settings: Settings, job_types: Sequence[str]) -> list[str]:
        jet, routing = settings.jetstream, settings.routing

        def partitions(job_type: str, main: str) -> list[str]:  # every level's `<subject>.<n>`
            return (
                [f"{s}.*" for s in routing.level_destinations(main)] if jet.key_partitions else []
            )

        def scheduled(job_type: str, main: str) -> list[str]:
            return schedule_subjects([main])

        destinations = plan_destinations(settings, job_types, [partitions, scheduled])
        subjects = [
            level
            for job_type in job_types
            for level in routing.level_destinations(routing.subject(job_type))
        ]
        client = await connect_nats(settings.nats)
        try:
            # Replicas from the cluster's size, once, for the streams and the buckets alike.
            routing = routing.model_copy(
                update={"replication_factor": nats_replicas(client, routing)}
            )
            settings = settings.model_copy(update={"routing": routing})
            publisher = NatsPublisher(settings.nats, settings.routing)
            await publisher.start()
            try:
                created = await publisher.ensure(destinations)
            finally:
                await publisher.stop()
            state = "created" if created else "exists (subjects and limits brought up to date)"
            lines = [f"nats stream {routing.stream}: {state}; captures {', '.join(destinations)}"]
            js = client.jetstream(timeout=settings.nats.publish_timeout_s)
            await ensure_key_partitions(js, settings)
            lines.append(f"nats stream {routing.stream}: {jet.key_partitions} key partitions")
            created = await ensure_dead_letter_stream(js, settings, subjects)
            state = "created" if created else "exists (subjects and limits brought up to date)"
            lines.append(f"nats stream {jet.dead_letter_stream_for(routing.stream)}: {state}")
            for name in await ensure_consumers(js, settings, subjects):
                lines.append(f"nats consumer {routing.stream} > {name}: created or updated")
            if settings.idempotency.backend == "nats-kv":
                idempotency = settings.idempotency
                config = bucket_config(
                    idempotency.namespace,
                    idempotency.retention_s,
                    replicas=routing.replication_factor,
                    max_bytes=jet.kv_max_bytes,
                )
                state = (
                    "created" if await provision_bucket(js, config) else "exists (limits updated)"
                )
                lines.append(f"nats kv bucket {config.bucket}: {state}")
            await ensure_replay_ledger(js, settings)
            lines.append(f"nats kv bucket {jet.replay_ledger_bucket}: ready")
            first_failures = first_failure_bucket_config(settings)
            new = await provision_bucket(js, first_failures)
            state = "created" if new else "exists (limits updated)"
            lines.append(f"nats kv bucket {first_failures.bucket}: {state}")
        finally:
            await client.close()
        return lines

    def dead_letter_destinations(self, settings: Settings, job_types: Iterable[str]) -> list[str]:
        subjects = {settings.routing.subject(job_type) for job_type in job_types}
        return sorted(dead_letter_subjects(settings, subjects))

    async def find_dead_letters(
        self, settings: Settings, destinations: Sequence[str], where: DeadLetterFilter
    ) -> list[DeadLetterRecord]:
        return await list_nats_dead_letters(settings, destinations, where)

    async def replay(
        self,
        settings: Settings,
        records: Iterable[DeadLetterRecord],
        *,
        force: bool = False,
        dry_run: bool = False,
        rate_per_s: float = 50.0,
    ) -> list[ReplayResult]:
        return await replay_nats(
            settings, records, force=force, dry_run=dry_run, rate_per_s=rate_per_s
        )
