"""`jobstream dlq list|show|replay`: find, inspect and replay dead letters.

Kafka: the `<topic>.dlq` topics and the replay ledger topic. NATS: the dead-letter stream
(`<stream>_DLQ`, subjects `dlq.<subject>`) and the replay ledger KV bucket.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from consumer import Settings
from consumer.core import DeadLetterFilter, DeadLetterRecord, ReplayResult
from consumer.telemetry import configure
from jobstream import _dlq
from jobstream._config import fail, import_job_modules, load_settings, run

TypeOption = Annotated[str | None, typer.Option("--type", help="Only this job type.")]
ReasonOption = Annotated[
    str | None, typer.Option(help="Only this reason (e.g. retries-exhausted).")
]
SinceOption = Annotated[
    str | None, typer.Option(help="Failed at or after (ISO 8601, e.g. 2026-11-22T10:00Z).")
]
UntilOption = Annotated[str | None, typer.Option(help="Failed at or before (ISO 8601).")]
TopicOption = Annotated[
    list[str] | None,
    typer.Option(
        "--topic",
        help="Dead-letter topic(s), or NATS dead-letter subject(s), to read (default: those "
        "of every registered job type).",
    ),
]


IdsArgument = Annotated[list[str] | None, typer.Argument(help="Dead letter ids or job ids.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would be replayed.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replay even if replayed before.")]


def _time(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise fail(
            f"{flag} {value!r} is not an ISO 8601 time (e.g. 2026-11-22T10:00:00Z)", 2
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _topics(settings: Settings, topics: list[str] | None) -> list[str]:
    if topics:
        return topics
    import_job_modules(settings)
    destinations = _dlq.default_destinations(settings)
    if not destinations:
        raise fail("no job types registered: set JOBSTREAM_JOB_MODULES or pass --topic", 2)
    return destinations


def _filter(
    job_type: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: list[str] | None = None,
) -> DeadLetterFilter:
    return DeadLetterFilter(
        job_type, reason, _time(since, "--since"), _time(until, "--until"), frozenset(ids or ())
    )


def _settings() -> Settings:
    settings = load_settings(Settings)
    if settings.transport not in ("kafka", "nats"):
        raise fail("jobstream dlq reads Kafka or NATS dead letters: set JOBSTREAM_TRANSPORT", 2)
    return settings


async def _list(
    settings: Settings, topics: list[str], where: DeadLetterFilter
) -> list[DeadLetterRecord]:
    return await _dlq.find(settings, topics, where)


async def _replay(
    settings: Settings,
    records: list[DeadLetterRecord],
    *,
    force: bool,
    dry_run: bool,
    rate: float,
) -> list[ReplayResult]:
    return await _dlq.replay(settings, records, force=force, dry_run=dry_run, rate=rate)


def register(app: typer.Typer) -> None:
    dlq = typer.Typer(help="Dead letters: list, inspect and replay jobs that failed for good.")
    app.add_typer(dlq, name="dlq")

    @dlq.command("list")
    def list_(
        job_type: TypeOption = None,
        reason: ReasonOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        topic: TopicOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    ) -> None:
        """List dead letters, oldest first, with the reason each job failed."""
        settings = _settings()
        topics = _topics(settings, topic)
        where = _filter(job_type, reason, since, until)
        records = run(lambda: _list(settings, topics, where))
        if as_json:
            for record in records:
                typer.echo(json.dumps(record.summary()))
            return
        table = Table(title=f"{len(records)} dead letters")
        for column in ("id", "job id", "type", "reason", "error", "attempts", "failed at"):
            table.add_column(column, overflow="fold")
        for r in records:
            table.add_row(
                r.id,
                r.job_id or "-",
                r.job_type or "-",
                r.reason,
                (r.ext("joberror") or "")[:60],
                r.ext("jobattempt") or "-",
                r.failed_at.isoformat(timespec="seconds"),
            )
        Console().print(table)

    @dlq.command("show")
    def show(
        dead_letter: Annotated[
            str,
            typer.Argument(
                help="Dead letter id (Kafka topic:partition:offset, NATS stream:sequence) or "
                "job id."
            ),
        ],
        topic: TopicOption = None,
    ) -> None:
        """Print one dead letter: failure details, every header, the body."""
        settings = _settings()
        topics = _topics(settings, topic)
        found = run(lambda: _list(settings, topics, _filter(None, None, None, None, [dead_letter])))
        if not found:
            raise fail(f"no dead letter {dead_letter!r} in {', '.join(topics)}")
        for record in found:
            typer.echo(json.dumps(_dlq.full(record), indent=2))

    @dlq.command("replay")
    def replay_(
        dead_letters: IdsArgument = None,
        job_type: TypeOption = None,
        reason: ReasonOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        topic: TopicOption = None,
        dry_run: DryRunOption = False,
        force: ForceOption = False,
        rate: Annotated[float, typer.Option(min=0.1, help="Most replays per second.")] = 50.0,
    ) -> None:
        """Republish dead letters to their original topic, attempts reset. Each dead letter
        is replayed once: a second replay needs --force."""
        if not dead_letters and not (job_type or reason or since or until):
            raise fail(
                "name dead letters to replay, or filter them (--type, --reason, --since, --until)",
                2,
            )
        settings = _settings()
        topics = _topics(settings, topic)
        where = _filter(job_type, reason, since, until, dead_letters)

        async def body() -> list[tuple[str, str, str]]:
            # Replays are spans of their own (linked to each job's origin) when OTEL_* say so.
            telemetry = configure("jobstream-cli")
            try:
                records = await _list(settings, topics, where)
                results = await _replay(settings, records, force=force, dry_run=dry_run, rate=rate)
            finally:
                await asyncio.to_thread(telemetry.shutdown)
            return [(r.record.id, r.status, r.destination) for r in results]

        results = run(body)
        for dead_letter_id, status, destination in results:
            typer.echo(json.dumps({"id": dead_letter_id, "status": status, "to": destination}))
        if not results:
            typer.echo("no dead letters matched", err=True)
