"""`jobstream publish --delay/--not-before` (and an `--envelope` line's `delay`/`not_before`),
`jobstream jobs status|cancel` of a scheduled job (issue 15): the CLI run in this process on
the memory transport, so the records it published are read back from the broker; every
bad value is one stderr line, exit 2, and publishes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from consumer.stores import JobState, MemoryStatusStore, StatusStore
from jobstream import _cli_ingress
from jobstream._cli import app
from producer.memory import BROKER

PAYLOAD = '{"account_id": "acct-1", "month": "2025-01"}'
AT = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
"""A `--not-before` within the maximum delay, whole seconds."""
LATER = AT + timedelta(hours=1)


@pytest.fixture
def topic(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh memory topic that `report.generate` is routed to; no other JOBSTREAM_*."""
    name = f"cli-schedule-{uuid.uuid4().hex[:8]}"
    BROKER.create_topic(name)
    for variable in [v for v in os.environ if v.startswith("JOBSTREAM_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("JOBSTREAM_TRANSPORT", "memory")
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"report.generate": name}))
    yield name
    BROKER.faults.reset()


def jobstream(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin)


def published(topic: str) -> dict[str, datetime | None]:
    """Job id -> its `not_before` (the `ce_jobnotbefore` header), for every record."""
    found: dict[str, datetime | None] = {}
    for partition in range(BROKER.partitions(topic)):
        for record in BROKER.read(topic, partition, 0, 1000):
            headers = dict(record.headers)
            raw = headers.get("ce_jobnotbefore")
            due = datetime.fromisoformat(raw.decode()) if raw is not None else None
            found[headers["ce_id"].decode()] = due
    return found


def receipts(result: Result) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return [json.loads(line)["job_id"] for line in result.stdout.splitlines()]


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_delay_delays_the_data_job_by_that_many_seconds(topic: str) -> None:
    before = datetime.now(UTC)
    [job_id] = receipts(jobstream("publish", "report.generate", "--data", PAYLOAD, "--delay", "30"))
    after = datetime.now(UTC)
    due = published(topic)[job_id]
    assert due is not None
    assert before + timedelta(seconds=30) <= due <= after + timedelta(seconds=30)


def test_not_before_is_written_as_given_in_utc(topic: str) -> None:
    in_paris = AT.astimezone(timezone(timedelta(hours=1))).isoformat()  # ...+01:00
    args = ["--not-before", in_paris, "--id", "job-at"]
    assert receipts(jobstream("publish", "report.generate", "--data", PAYLOAD, *args)) == ["job-at"]
    assert published(topic) == {"job-at": AT}


def test_without_either_the_job_has_no_not_before(topic: str) -> None:
    [job_id] = receipts(jobstream("publish", "report.generate", "--data", PAYLOAD))
    assert published(topic) == {job_id: None}


def test_the_flags_apply_to_every_stdin_job(topic: str) -> None:
    lines = f"{PAYLOAD}\n{PAYLOAD}\n"
    at = receipts(
        jobstream("publish", "report.generate", "--not-before", AT.isoformat(), stdin=lines)
    )
    before = datetime.now(UTC)
    later = receipts(jobstream("publish", "report.generate", "--delay", "2.5", stdin=lines))
    after = datetime.now(UTC)
    found = published(topic)
    assert len(at) == len(later) == 2 and len(found) == 4
    assert {found[job_id] for job_id in at} == {AT}
    for job_id in later:
        due = found[job_id]
        assert due is not None
        assert before + timedelta(seconds=2.5) <= due <= after + timedelta(seconds=2.5)


def test_an_envelope_lines_own_delay_or_not_before_replaces_the_flags(topic: str) -> None:
    lines = [
        {"data": json.loads(PAYLOAD), "id": "own-time", "not_before": LATER.isoformat()},
        {"data": json.loads(PAYLOAD), "id": "own-delay", "delay": 60},
        {"data": json.loads(PAYLOAD), "id": "flag"},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    before = datetime.now(UTC)
    result = jobstream(
        "publish",
        "report.generate",
        "--envelope",
        "--not-before",
        AT.isoformat(),
        stdin=stdin,
    )
    after = datetime.now(UTC)
    assert receipts(result) == ["own-time", "own-delay", "flag"]
    found = published(topic)
    assert (found["own-time"], found["flag"]) == (LATER, AT)
    own_delay = found["own-delay"]
    assert own_delay is not None
    assert before + timedelta(seconds=60) <= own_delay <= after + timedelta(seconds=60)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--delay", "5", "--not-before", "2030-01-02T09:30:00Z"],
            "error: give --delay or --not-before, not both",
        ),
        (["--delay", "-1"], "error: --delay must be a finite number of seconds >= 0, got '-1'"),
        (["--delay", "nan"], "error: --delay must be a finite number of seconds >= 0, got 'nan'"),
        (["--delay", "inf"], "error: --delay must be a finite number of seconds >= 0, got 'inf'"),
        (
            ["--delay", "soon"],
            "error: --delay must be a number of seconds (e.g. 30 or 2.5), got 'soon'",
        ),
        (
            ["--delay", "604801"],
            "error: --delay 604801 is longer than the 7 days a job may wait "
            "(consumer.core.MAX_DELAY_S); publish it closer to its time "
            "(docs/scheduling.md, Maximum delay)",
        ),
        (
            ["--not-before", "2099-01-02T09:30:00Z"],
            "error: --not-before 2099-01-02T09:30:00Z is further ahead than the 7 days a job "
            "may wait (consumer.core.MAX_DELAY_S); publish it closer to its time "
            "(docs/scheduling.md, Maximum delay)",
        ),
        (
            ["--not-before", "2030-01-02T09:30:00"],
            "error: --not-before '2030-01-02T09:30:00' has no timezone: add one (e.g. "
            "2026-12-01T09:30:00Z or 2026-12-01T10:30:00+01:00)",
        ),
        (
            ["--not-before", "next tuesday"],
            "error: --not-before must be an ISO 8601 time with a timezone (e.g. "
            "2026-12-01T09:30:00Z or 2026-12-01T10:30:00+01:00), got 'next tuesday'",
        ),
    ],
)
@pytest.mark.parametrize("source", ["--data", "stdin"])
def test_a_bad_flag_is_one_line_exit_2_and_publishes_nothing(
    topic: str, flags: list[str], message: str, source: str
) -> None:
    if source == "--data":
        result = jobstream("publish", "report.generate", "--data", PAYLOAD, *flags)
    else:
        result = jobstream("publish", "report.generate", *flags, stdin=f"{PAYLOAD}\n")
    assert one_error_line(result) == message
    assert published(topic) == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"delay": 5, "not_before": "2030-01-02T09:30:00Z"},
            'error: stdin line 2: give "delay" or "not_before", not both',
        ),
        (
            {"delay": -0.5},
            'error: stdin line 2: "delay" must be a finite number of seconds >= 0, got -0.5',
        ),
        (
            {"delay": "30"},
            "error: stdin line 2: \"delay\" must be a JSON number of seconds, got '30'",
        ),
        ({"delay": True}, 'error: stdin line 2: "delay" must be a number of seconds, got True'),
        (
            {"not_before": "2030-01-02T09:30:00"},
            "error: stdin line 2: \"not_before\" '2030-01-02T09:30:00' has no timezone: add "
            "one (e.g. 2026-12-01T09:30:00Z or 2026-12-01T10:30:00+01:00)",
        ),
        (
            {"not_before": 1893577800},
            'error: stdin line 2: "not_before" must be an ISO 8601 time with a timezone (e.g. '
            "2026-12-01T09:30:00Z or 2026-12-01T10:30:00+01:00), got 1893577800",
        ),
    ],
)
def test_a_bad_envelope_schedule_names_its_line_and_publishes_nothing(
    topic: str, extra: dict[str, Any], message: str
) -> None:
    good = {"data": json.loads(PAYLOAD), "delay": 1}
    stdin = json.dumps(good) + "\n" + json.dumps({"data": json.loads(PAYLOAD), **extra}) + "\n"
    result = jobstream("publish", "report.generate", "--envelope", stdin=stdin)
    assert one_error_line(result) == message
    assert published(topic) == {}


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryStatusStore:
    """The status store `jobstream jobs` opens: one shared memory store, as Redis would be."""
    shared = MemoryStatusStore()

    async def opened(_: object) -> StatusStore:
        return shared

    monkeypatch.setenv("JOBSTREAM_STATUS__BACKEND", "memory")
    monkeypatch.setattr(_cli_ingress, "_with_status", opened)
    return shared


def test_jobs_status_shows_a_scheduled_job_and_cancel_skips_it(
    topic: str, store: MemoryStatusStore
) -> None:
    due = datetime(2030, 1, 2, 9, 30, tzinfo=UTC)
    asyncio.run(store.record("j-1", JobState.SCHEDULED, job_type="report.generate", not_before=due))
    shown = jobstream("jobs", "status", "j-1")
    assert shown.exit_code == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["state"], status["not_before"]) == ("scheduled", "2030-01-02T09:30:00Z")
    cancelled = jobstream("jobs", "cancel", "j-1")
    assert cancelled.exit_code == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"job_id": "j-1", "state": "cancelled"}
    assert asyncio.run(store.cancelled(["j-1"])) == {"j-1"}
    again = jobstream("jobs", "cancel", "j-1")
    assert again.exit_code == 1
    assert again.stderr.strip() == "error: job j-1 is already cancelled: nothing to cancel"
