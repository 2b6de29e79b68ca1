"""`jobstream topics ensure`: create the topics (Kafka) or the stream (NATS) jobs need.

Provisioning is explicit: publishing never creates a topic unless `create_missing` is on.
The command is idempotent; run it on deploy, before workers and producers start.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from consumer import Settings
from consumer._dead_letters import ReplayLedger
from jobstream._config import USAGE, fail, import_job_modules, load_settings, run
from producer import DestinationHook, JobProducer, ProducerSettings, plan_destinations
from schemas import default_registry


def failure_topics(settings: Settings) -> DestinationHook:
    """Kafka: each main topic's retry tiers and dead-letter topic are provisioned with it."""

    def hook(job_type: str, main: str) -> list[str]:
        retry = settings.retry
        tiers = [] if retry.in_place else retry.tier_topics(main)
        return [*tiers, retry.dead_letter_topic(main)]

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
        hooks = [failure_topics(settings)] if settings.transport == "kafka" else []
        destinations = plan_destinations(settings, job_types, hooks)
        created = run(lambda: _ensure(settings, destinations))
        _report(settings, destinations, created)


async def _ensure(settings: Settings, destinations: list[str]) -> list[str]:
    async with JobProducer(settings) as producer:
        created = await producer.publisher.ensure(destinations)
    if settings.transport == "kafka":
        await ReplayLedger(settings).ensure()
    return created


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
