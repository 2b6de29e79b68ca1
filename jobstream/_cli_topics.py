"""`jobstream topics ensure`: create the topics (Kafka) or the streams (NATS) jobs need.

The backend (`consumer.backend_for`) does the work and reports one line per thing. Kafka:
each job type's topic, its retry tier topics and its dead-letter topic, and the replay
ledger topic. NATS: the job stream (with its key partition count in its metadata), the dead-letter
stream, the group's durable consumers, the idempotency KV bucket (backend `nats-kv`) and the
replay ledger bucket, each with the limits from the settings (docs/nats.md).

Provisioning is explicit: publishing never creates a topic unless `create_missing` is on.
The command is idempotent; run it on deploy, before workers and producers start.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from consumer import Settings, backend_for
from jobstream._config import USAGE, fail, import_job_modules, load_settings, run
from schemas import default_registry


def register(app: typer.Typer) -> None:
    topics = typer.Typer(help="Topics (Kafka) and streams (NATS) for the registered job types.")
    app.add_typer(topics, name="topics")

    @topics.command(
        "ensure",
        help="Create every missing topic (Kafka) or the stream (NATS) for the job types in "
        "JOBSTREAM_JOB_MODULES. Idempotent; run it on deploy.\n\n"
        "Kafka topics get JOBSTREAM_ROUTING__PARTITIONS partitions and "
        "JOBSTREAM_ROUTING__REPLICATION_FACTOR replicas (default: from the cluster's size, "
        "3 with min.insync.replicas=2 on 3 brokers or more); existing topics are left "
        "unchanged. "
        "The NATS stream JOBSTREAM_ROUTING__STREAM is created (R3 on a cluster of 3 or more), "
        "or given missing subjects and the configured limits.",
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
        for line in run(lambda: backend_for(settings.transport).provision(settings, job_types)):
            typer.echo(line)
