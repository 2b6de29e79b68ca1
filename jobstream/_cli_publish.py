"""`jobstream publish TYPE`: validate payloads and publish them, printing the receipts.

One job: `--data '{"user_id": "42", ...}'` or `--data @payload.json`. Many jobs: no
`--data` and newline-delimited JSON on stdin, one payload per line (with `--envelope`, one
`{"data": {...}, "key": ..., "id": ..., "idempotency_key": ..., "subject": ..., "delay": ...,
"not_before": ..., "priority": ..., "unique_key": ..., "unique_for": ...}` per line).
`--delay SECONDS` or `--not-before TIME` delays every job, `--priority` sets its level,
`--unique-key K --unique-for SECONDS` makes it unique (a line's own fields replace them;
`jobstream._job_options` parses all of them, as the ingress does).
Every payload is validated before the first one is sent, so a bad line sends nothing.
Each receipt is printed as one JSON line as soon as the broker acknowledged it.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from jobstream._config import RUNTIME, USAGE, fail, import_job_modules, run, settings_for
from jobstream._job_options import JobOptions, parse_job_options
from producer import (
    JobProducer,
    PublishError,
    PublishRequest,
    Receipt,
    UniqueKeyBusy,
    UniqueStoreUnavailable,
)
from schemas import JobDecodeError

STDIN_BATCH = 1000
"""Jobs read from stdin are published (and their receipts printed) this many at a time."""
_OPTIONAL_FIELDS: tuple[str, ...] = ("key", "id", "idempotency_key", "subject")
_OPTIONAL_FIELDS += ("delay", "not_before", "priority", "unique_key", "unique_for")
_ENVELOPE_FIELDS = frozenset({"data", *_OPTIONAL_FIELDS})


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
                '"idempotency_key": ..., "subject": ..., "delay": SECONDS, "not_before": TIME, '
                '"priority": LEVEL, "unique_key": ..., "unique_for": SECONDS} instead of bare '
                "payloads.",
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
        priority: Annotated[
            str | None,
            typer.Option(
                metavar="high|normal|low",
                help="Priority level (default: normal); high and low need "
                "JOBSTREAM_ROUTING__PRIORITIES=true (docs/scheduling.md#priorities).",
            ),
        ] = None,
        unique_key: Annotated[
            str | None,
            typer.Option(
                "--unique-key",
                help="While a job published with this key is inside its --unique-for window, "
                "print that job's receipt instead of publishing (needs JOBSTREAM_UNIQUE__URL).",
            ),
        ] = None,
        unique_for: Annotated[
            str | None,
            typer.Option(
                "--unique-for",
                metavar="SECONDS",
                help="The --unique-key window, from the first publish, in seconds.",
            ),
        ] = None,
    ) -> None:
        """Validate and publish jobs; print one JSON receipt per job."""
        flags: dict[str, object] = {
            "delay": delay,
            "not_before": not_before,
            "priority": priority,
            "unique_key": unique_key,
            "unique_for": unique_for,
        }
        options = _options(flags.get, "flags")
        settings = settings_for(transport=transport)
        import_job_modules(settings)
        producer = JobProducer(settings)
        if data is not None:
            job = _validated(producer, job_type, _read_data(data), version, where="--data")
            # Known before the publish, so that an error can name it.
            job_id = job_id or str(uuid.uuid4())
            request = PublishRequest(job, key=key, id=job_id, **options.publish_options())
            _checked(producer, request, None)
            receipts = run(lambda: _publish_one(producer, request, options))
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
        requests = list(_requests(producer, job_type, lines, version, key, envelope, flags))
        if not requests:
            raise fail("stdin held no jobs: write one JSON payload per line", USAGE)
        run(lambda: _publish_all(producer, requests))


def _options(get: Callable[[str], object], where: str) -> JobOptions:
    """The options `get` gives, spelled as flags (`--unique-key`) for the flags and as
    fields (`"unique_key"`) for an envelope line; a bad one is one line and exit 2."""

    flags = where == "flags"

    def names(name: str) -> str:
        return "--" + name.replace("_", "-") if flags else f'"{name}"'

    try:
        return parse_job_options(get, names)
    except ValueError as error:
        raise fail(str(error) if flags else f"{where}: {error}", USAGE) from None


def _checked(producer: JobProducer, request: PublishRequest, where: str | None) -> None:
    """What the producer would refuse before sending (a level the routing does not allow,
    a unique key without a store, a window over `unique.max_for_s`, ...): one line, exit 2,
    before any job of the batch is sent."""
    try:
        producer.check(request)
    except ValueError as error:
        message = " ".join(str(error).split())
        raise fail(message if where is None else f"{where}: {message}", USAGE) from None


async def _publish_one(
    producer: JobProducer, request: PublishRequest, options: JobOptions
) -> list[Receipt]:
    try:
        async with producer:
            publish = producer.publish
            return [
                await publish(
                    request.job, key=request.key, id=request.id, **options.publish_options()
                )
            ]
    except PublishError as error:
        if not error.retriable:
            raise
        message = " ".join(str(error).split())
        if isinstance(error, UniqueStoreUnavailable | UniqueKeyBusy):
            raise fail(message, RUNTIME) from None  # nothing sent: publish again as it was
        # Retriable (unreachable, busy, timed out): the job may be stored (a timeout is
        # ambiguous); publishing it again under the same id is deduplicated.
        job_id = request.id
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
    flags: dict[str, object],
) -> Iterator[PublishRequest]:
    same = _options(flags.get, "flags").publish_options()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"stdin line {number}"
        if not envelope:
            job = _validated(producer, job_type, line, version, where=where)
            request = PublishRequest(job, key=key, **same)
            _checked(producer, request, where)
            yield request
            continue
        try:
            item = json.loads(line)
        except ValueError as error:
            raise fail(f"{where}: not JSON ({error})", USAGE) from None
        if not isinstance(item, dict) or "data" not in item or item.keys() - _ENVELOPE_FIELDS:
            fields = ", ".join(f'"{name}"' for name in _OPTIONAL_FIELDS)
            raise fail(
                f'{where}: an --envelope line is a JSON object with "data" and optionally {fields}',
                USAGE,
            )
        job = _validated(producer, job_type, json.dumps(item["data"]), version, where=where)
        names = {name: item.get(name) for name in ("id", "idempotency_key", "subject")}
        if not all(isinstance(v, str | None) for v in [*names.values(), item.get("key")]):
            raise fail(f"{where}: key, id, idempotency_key and subject must be strings", USAGE)
        options = _line_options(item, where, flags).publish_options()
        request = PublishRequest(
            job,
            key=item.get("key", key),
            id=names["id"],
            idempotency_key=names["idempotency_key"],
            subject=names["subject"],
            **options,
        )
        _checked(producer, request, where)
        yield request


def _line_options(item: dict[str, Any], where: str, flags: dict[str, object]) -> JobOptions:
    """An envelope line's options: its own `delay` or `not_before` (a number of seconds,
    an ISO 8601 time with a timezone) replace the flags' two, its `priority` the flag's,
    its `unique_key` or `unique_for` the flags' two; the flags' where it gives none."""
    for name in ("delay", "unique_for"):  # strict JSON, as payloads: "30" is not a number
        if isinstance(item.get(name), str):
            raise fail(
                f'{where}: "{name}" must be a JSON number of seconds, got {item[name]!r}', USAGE
            )
    given = dict(flags)
    for pair in (("delay", "not_before"), ("unique_key", "unique_for"), ("priority",)):
        if any(item.get(name) is not None for name in pair):  # null: not given
            given.update({name: item.get(name) for name in pair})
    return _options(given.get, where)
