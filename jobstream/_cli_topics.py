"""`jobstream topics ensure`: create the topics (Kafka) or the streams (NATS) jobs need.

NATS: the job stream (with its key partition count in its metadata), the dead-letter
stream, the group's durable consumers, the idempotency KV bucket (backend `nats-kv`) and the
replay ledger bucket, each with the limits from the settings (docs/nats.md).

Provisioning is explicit: publishing never creates a topic unless `create_missing` is on.
The command is idempotent; run it on deploy, before workers and producers start.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from consumer import Settings
from consumer._dead_letters import ReplayLedger
from jobstream._config import USAGE, fail, import_job_modules, load_settings, run
from producer import (
    DestinationHook,
    JobProducer,
    ProducerSettings,
    connect_nats,
    plan_destinations,
)
from schemas import default_registry


def failure_topics(settings: Settings) -> DestinationHook:
    """Kafka: each main topic's retry tiers and dead-letter topic are provisioned with it."""

    def hook(job_type: str, main: str) -> list[str]:
        retry = settings.retry
        tiers = [] if retry.in_place else retry.tier_topics(main)
        return [*tiers, retry.dead_letter_topic(main)]

    return hook


def partition_subjects(settings: Settings) -> DestinationHook:
    """NATS with key partitions: `<subject>.*` is captured with each subject."""

    def hook(job_type: str, main: str) -> list[str]:
        return [f"{main}.*"] if settings.jetstream.key_partitions else []

    return hook


def register(app: typer.Typer) -> None:
    topics = typer.Typer(help="Topics (Kafka) and streams (NATS) for the registered job types.")
    app.add_typer(topics, name="topics")

    @topics.command(
        "ensure",
        help="Create every missing topic (Kafka) or the stream (NATS) for the job types in "
        "JOBSTREAM_JOB_MODULES. Idempotent; run it on deploy.\n\n"
        "Kafka topics get JOBSTREAM_ROUTING__PARTITIONS partitions and "
        "JOBSTREAM_ROUTING__REPLICATION_FACTOR replicas; existing topics are left unchanged. "
        "The NATS stream JOBSTREAM_ROUTING__STREAM is created, or given missing subjects and "
        "the configured limits.",
    )
    def ensure(
        transport: Annotated[
            Literal["kafka", "nats"] | None,
            typer.Option(help="Broker to provision (default: JOBSTREAM_TRANSPORT, kafka)."),
        ] = None,
    ) -> None:
        settings = load_settings(Settings, transport=transport)
        import_job_modules(settings)
        job_types = default_registry.job_types()
        if not job_types:
            raise fail(
                "no job types registered: set JOBSTREAM_JOB_MODULES to the modules that "
                "declare them",
                USAGE,
            )
        nats = settings.transport == "nats"
        hooks = [partition_subjects(settings) if nats else failure_topics(settings)]
        destinations = plan_destinations(settings, job_types, hooks)
        created = run(lambda: _ensure(settings, destinations))
        _report(settings, destinations, created)
        if nats:
            subjects = [settings.routing.subject(job_type) for job_type in job_types]
            for line in run(lambda: _ensure_nats(settings, subjects)):
                typer.echo(line)


async def _ensure(settings: Settings, destinations: list[str]) -> list[str]:
    async with JobProducer(settings) as producer:
        created = await producer.publisher.ensure(destinations)
    if settings.transport == "kafka":
        await ReplayLedger(settings).ensure()
    return created


async def _ensure_nats(settings: Settings, subjects: list[str]) -> list[str]:
    """What the NATS workers need beyond the job stream; one report line each."""
    from consumer._idempotency_nats import bucket_config, provision_bucket  # noqa: PLC0415
    from consumer._nats_provision import ensure_consumers, ensure_key_partitions  # noqa: PLC0415
    from consumer._nats_routing import (  # noqa: PLC0415
        ensure_dead_letter_stream,
        ensure_replay_ledger,
    )

    jet, routing = settings.jetstream, settings.routing
    lines = []
    client = await connect_nats(settings.nats)
    try:
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
                idempotency.namespace, idempotency.retention_s,
                replicas=routing.replication_factor, max_bytes=jet.kv_max_bytes,
            )  # fmt: skip
            state = "created" if await provision_bucket(js, config) else "exists (limits updated)"
            lines.append(f"nats kv bucket {config.bucket}: {state}")
        await ensure_replay_ledger(js, settings)
        lines.append(f"nats kv bucket {jet.replay_ledger_bucket}: ready")
    finally:
        await client.close()
    return lines


def _report(settings: ProducerSettings, destinations: list[str], created: list[str]) -> None:
    if settings.transport == "nats":
        stream = settings.routing.stream
        state = (
            "created" if stream in created else "exists (subjects and limits brought up to date)"
        )
        typer.echo(f"nats stream {stream}: {state}; captures {', '.join(destinations)}")
        return
    for topic in destinations:
        typer.echo(
            f"{settings.transport} topic {topic}: {'created' if topic in created else 'exists'}"
        )
