"""`jobstream publish TYPE`: validate payloads and publish them, printing the receipts.

One job: `--data '{"user_id": "42", ...}'` or `--data @payload.json`. Many jobs: no
`--data` and newline-delimited JSON on stdin, one payload per line (with `--envelope`, one
`{"data": {...}, "key": ..., "id": ..., "idempotency_key": ..., "subject": ..., "delay": ...,
"not_before": ...}` per line). `--delay SECONDS` or `--not-before TIME` delays every job
(a line's own `delay` or `not_before` replaces them; `jobstream._schedule` parses both).
Every payload is validated before the first one is sent, so a bad line sends nothing.
Each receipt is printed as one JSON line as soon as the broker acknowledged it.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from jobstream._config import RUNTIME, USAGE, fail, import_job_modules, run, settings_for
from jobstream._schedule import Schedule, parse_schedule
from producer import JobProducer, PublishError, PublishRequest, Receipt
from schemas import JobDecodeError

STDIN_BATCH = 1000
"""Jobs read from stdin are published (and their receipts printed) this many at a time."""
_ENVELOPE_FIELDS = frozenset(
    {"data", "key", "id", "idempotency_key", "subject", "delay", "not_before"}
)


def register(app: typer.Typer) -> None:
    @app.command("publish")
    def publish(
        job_type: Annotated[
            str, typer.Argument(metavar="TYPE", help="Job type, e.g. email.welcome.")
        ],
        data: Annotated[
            str | None,
            typer.Option(
                "--data",
                "-d",
                help="Payload as JSON, or @FILE. Without it, newline-delimited JSON is read "
                "from stdin (one job per line).",
            ),
        ] = None,
        key: Annotated[
            str | None, typer.Option(help="Ordering key (Kafka record key); every job gets it.")
        ] = None,
        job_id: Annotated[
            str | None, typer.Option("--id", help="Job id (default: a random UUID).")
        ] = None,
        version: Annotated[
            int | None, typer.Option(min=1, help="Schema version (default: the latest).")
        ] = None,
        transport: Annotated[
            Literal["kafka", "nats"] | None,
            typer.Option(help="Broker to publish to (default: JOBSTREAM_TRANSPORT, kafka)."),
        ] = None,
        envelope: Annotated[
            bool,
            typer.Option(
                "--envelope",
                help='Stdin lines are {"data": PAYLOAD, "key": ..., "id": ..., '
                '"idempotency_key": ..., "subject": ..., "delay": SECONDS, "not_before": TIME} '
                "instead of bare payloads.",
            ),
        ] = False,
        delay: Annotated[
            str | None,
            typer.Option(
                "--delay",
                metavar="SECONDS",
                help="Do not start the job(s) before SECONDS after they are published "
                "(at most 7 days); not with --not-before.",
            ),
        ] = None,
        not_before: Annotated[
            str | None,
            typer.Option(
                "--not-before",
                metavar="TIME",
                help="Do not start the job(s) before TIME, ISO 8601 with a timezone "
                "(2026-12-01T09:30:00Z, ...+01:00; at most 7 days ahead); not with --delay.",
            ),
        ] = None,
    ) -> None:
        """Validate and publish jobs; print one JSON receipt per job."""
        try:
            schedule = parse_schedule(delay, not_before, names=("--delay", "--not-before"))
        except ValueError as error:
            raise fail(str(error), USAGE) from None
        timing = _timing(schedule)
        settings = settings_for(transport=transport)
        import_job_modules(settings)
        producer = JobProducer(settings)
        if data is not None:
            job = _validated(producer, job_type, _read_data(data), version, where="--data")
            receipts = run(lambda: _publish_one(producer, job, key, job_id, timing))
            _print(receipts)
            return
        if sys.stdin is None or sys.stdin.isatty():
            raise fail(
                "no payload: pass --data JSON or --data @FILE, or pipe newline-delimited "
                "JSON on stdin",
                USAGE,
            )
        if job_id is not None:
            raise fail(
                "--id names a single job: give it with --data, or use --envelope and an "
                '"id" per stdin line',
                USAGE,
            )
        lines = sys.stdin
        requests = list(_requests(producer, job_type, lines, version, key, envelope, timing))
        if not requests:
            raise fail("stdin held no jobs: write one JSON payload per line", USAGE)
        run(lambda: _publish_all(producer, requests))


def _timing(schedule: Schedule | None) -> dict[str, Any]:
    """`publish`'s keywords for `schedule`: a delay stays relative (counted from each
    job's publish, as `publish(delay=)` does), a time is absolute."""
    if schedule is None:
        return {}
    if schedule.delay_s is not None:
        return {"delay": schedule.delay_s}
    return {"not_before": schedule.not_before}


async def _publish_one(
    producer: JobProducer, job: Any, key: str | None, job_id: str | None, timing: dict[str, Any]
) -> list[Receipt]:
    job_id = job_id or str(uuid.uuid4())  # known before the publish: an error can name it
    try:
        async with producer:
            return [await producer.publish(job, key=key, id=job_id, **timing)]
    except PublishError as error:
        if not error.retriable:
            raise
        # Retriable (unreachable, busy, timed out): the job may be stored (a timeout is
        # ambiguous); publishing it again under the same id is deduplicated.
        message = " ".join(str(error).split())
        raise fail(
            f"{message}; job id {job_id}: publish again with --id {job_id}", RUNTIME
        ) from None


async def _publish_all(producer: JobProducer, requests: list[PublishRequest]) -> None:
    async with producer:
        for start in range(0, len(requests), STDIN_BATCH):
            _print(await producer.publish_many(requests[start : start + STDIN_BATCH]))


def _print(receipts: Iterable[Receipt]) -> None:
    for receipt in receipts:
        typer.echo(json.dumps(receipt._asdict()))
    sys.stdout.flush()


def _read_data(data: str) -> str:
    if not data.startswith("@"):
        return data
    try:
        return Path(data[1:]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise fail(f"cannot read --data file {data[1:]!r}: {error}", USAGE) from None


def _validated(
    producer: JobProducer, job_type: str, data: Any, version: int | None, *, where: str
) -> Any:
    try:
        return producer.validate(job_type, data, version)
    except JobDecodeError as error:
        raise fail(f"{where}: {error}", USAGE) from None


def _requests(
    producer: JobProducer,
    job_type: str,
    lines: Iterable[str],
    version: int | None,
    key: str | None,
    envelope: bool,
    timing: dict[str, Any],
) -> Iterator[PublishRequest]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"stdin line {number}"
        if not envelope:
            job = _validated(producer, job_type, line, version, where=where)
            yield PublishRequest(job, key=key, **timing)
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise fail(f"{where}: not JSON ({error})", USAGE) from None
        if not isinstance(item, dict) or "data" not in item or item.keys() - _ENVELOPE_FIELDS:
            raise fail(
                f'{where}: an --envelope line is a JSON object with "data" and optionally '
                '"key", "id", "idempotency_key", "subject", "delay", "not_before"',
                USAGE,
            )
        job = _validated(producer, job_type, json.dumps(item["data"]), version, where=where)
        options = {name: item.get(name) for name in ("id", "idempotency_key", "subject")}
        if not all(isinstance(v, str | None) for v in [*options.values(), item.get("key")]):
            raise fail(f"{where}: key, id, idempotency_key and subject must be strings", USAGE)
        yield PublishRequest(
            job, key=item.get("key", key), **options, **_line_timing(item, where, timing)
        )


def _line_timing(item: dict[str, Any], where: str, timing: dict[str, Any]) -> dict[str, Any]:
    """An envelope line's own `delay` or `not_before` (a number of seconds, an ISO 8601
    time with a timezone), replacing the flags'; the flags' without either."""
    if isinstance(item.get("delay"), str):  # strict JSON, as payloads: "30" is not a number
        raise fail(
            f'{where}: "delay" must be a JSON number of seconds, got {item["delay"]!r}', USAGE
        )
    try:
        schedule = parse_schedule(
            item.get("delay"), item.get("not_before"), names=('"delay"', '"not_before"')
        )
    except ValueError as error:
        raise fail(f"{where}: {error}", USAGE) from None
    return timing if schedule is None else _timing(schedule)
