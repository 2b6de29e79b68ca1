"""`jobstream spool status|flush`: what the producer's durable spool holds, and publishing
it now. Both cover every slot file of the spool path (`<path>`, `<path>.1`, ...: one per
producer process, `spool.max_processes`).

`status` reads the slot files without their locks (running producers may own them) and
prints the jobs, bytes, the oldest job's age and the jobs per destination (with the
destinations that are blocked, and why), as a short table or JSON (`--json`); it exits 0
(1 with one line if a file is not a spool: nothing is modified). `flush` takes every slot
that no producer owns, publishes its jobs with the configured transport, and exits 1 with
one line if the broker cannot be reached (the jobs stay in the spool) or if a running
producer owns a slot (after publishing the others; that producer drains its own).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from jobstream._config import USAGE, fail, run, settings_for
from producer import (
    JobProducer,
    NotASpool,
    ProducerSettings,
    SpoolLocked,
    SpoolStatus,
    read_spool_status,
)

PathOption = Annotated[
    Path | None,
    typer.Option("--path", help="The spool path (default: JOBSTREAM_SPOOL__PATH)."),
]


def register(app: typer.Typer) -> None:
    spool = typer.Typer(help="The producer's durable spool for broker outages.")
    app.add_typer(spool, name="spool")

    @spool.command("status", help="Show what the spool holds (jobs, bytes, oldest age).")
    def status(
        path: PathOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        settings = settings_for()
        spool_path = _path(settings, path)
        try:
            found = read_spool_status(spool_path, settings.spool.max_processes)
        except NotASpool as error:
            raise fail(str(error)) from None
        except Exception as error:  # noqa: BLE001 - any unreadable file: one line, exit 1
            message = " ".join(str(error).split()) or type(error).__name__
            raise fail(f"cannot read the spool {spool_path}: {message}") from None
        if as_json:
            typer.echo(json.dumps(found._asdict()))
        else:
            _print(found)

    @spool.command(
        "flush",
        help="Publish every spooled job now with the configured transport (every slot no "
        "producer owns). Exits 1 if the broker cannot be reached or a producer owns a slot.",
    )
    def flush(
        path: PathOption = None,
        transport: Annotated[
            Literal["kafka", "nats"] | None,
            typer.Option(help="Broker to publish to (default: JOBSTREAM_TRANSPORT, kafka)."),
        ] = None,
    ) -> None:
        settings = settings_for(transport=transport)
        spool_path = _path(settings, path)
        spool = settings.spool.model_copy(update={"path": spool_path})
        producer = JobProducer(settings.model_copy(update={"spool": spool}))
        published, busy = run(lambda: _flush(producer))
        if published:
            typer.echo(f"{spool_path}: published {published} jobs")
        if busy:
            error = SpoolLocked(str(busy[0]))
            others = f" (and {len(busy) - 1} more slots)" if len(busy) > 1 else ""
            raise fail(f"{error}{others}")
        if not published:
            typer.echo(f"{spool_path}: nothing to publish; the spool is empty")
        else:
            typer.echo(f"{spool_path}: the spool is empty")


async def _flush(producer: JobProducer) -> tuple[int, list[Path]]:
    # The producer's warnings (broker not reachable) would repeat the one error line.
    logging.getLogger("jobstream.producer").setLevel(logging.ERROR)
    return await producer.flush_spool_slots()


def _path(settings: ProducerSettings, path: Path | None) -> Path:
    found = path if path is not None else settings.spool.path
    if found is None:
        raise fail("no spool: pass --path or set JOBSTREAM_SPOOL__PATH", USAGE)
    return found


def _print(status: SpoolStatus) -> None:
    age = "-" if status.oldest_age_s is None else f"{status.oldest_age_s:.1f}s"
    typer.echo(f"spool    {status.path} ({len(status.slots)} slot files)")
    typer.echo(f"jobs     {status.jobs}")
    typer.echo(f"bytes    {status.bytes}")
    typer.echo(f"oldest   {age}")
    typer.echo(f"refused  {status.refused}")
    for destination, count in sorted(status.destinations.items()):
        reason = status.blocked.get(destination)
        blocked = "" if reason is None else f"  blocked: {' '.join(reason.split())}"
        typer.echo(f"  {destination}  {count}{blocked}")
