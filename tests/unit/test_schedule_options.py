"""What `--delay`/`--not-before` and `?delay=`/`?not_before=` accept (`jobstream._schedule`),
how a schedule enters an `Idempotency-Key` fingerprint, and the status rules of a
`scheduled` job: it replaces no other state, and a cancel settles it at once (issue 15)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from consumer.core import MAX_DELAY_S
from consumer.stores import JobState, MemoryStatusStore, cancel_job
from jobstream._ingress_keys import fingerprint
from jobstream._schedule import Schedule, parse_schedule

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_nothing_given_is_no_schedule() -> None:
    assert parse_schedule(None, None, now=NOW) is None


@pytest.mark.parametrize(
    ("delay", "seconds"), [("0", 0.0), ("30", 30.0), ("2.5", 2.5), (7, 7.0), (0.25, 0.25)]
)
def test_a_delay_is_seconds_from_now(delay: object, seconds: float) -> None:
    assert parse_schedule(delay, None, now=NOW) == Schedule(
        NOW + timedelta(seconds=seconds), seconds
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-30T13:00:00Z", datetime(2026, 11, 30, 13, tzinfo=UTC)),
        ("2026-11-30T14:30:00+01:00", datetime(2026, 11, 30, 13, 30, tzinfo=UTC)),
        ("2026-11-30T13:00:00.250-00:30", datetime(2026, 11, 30, 13, 30, 0, 250000, tzinfo=UTC)),
        ("2020-01-01T00:00:00Z", datetime(2020, 1, 1, tzinfo=UTC)),  # past: runs at once
    ],
)
def test_a_time_is_iso_8601_with_a_timezone_read_as_utc(text: str, expected: datetime) -> None:
    schedule = parse_schedule(None, text, now=NOW)
    assert schedule == Schedule(expected, None)
    assert schedule.not_before.tzinfo is UTC


@pytest.mark.parametrize(
    ("delay", "not_before", "message"),
    [
        ("5", "2026-11-30T13:00:00Z", "give --delay or --not-before, not both"),
        ("-1", None, "--delay must be a finite number of seconds >= 0, got '-1'"),
        ("nan", None, "--delay must be a finite number of seconds >= 0, got 'nan'"),
        ("inf", None, "--delay must be a finite number of seconds >= 0, got 'inf'"),
        ("1e400", None, "--delay must be a finite number of seconds >= 0, got '1e400'"),
        ("soon", None, "--delay must be a number of seconds (e.g. 30 or 2.5), got 'soon'"),
        (True, None, "--delay must be a number of seconds, got True"),
        ([5], None, "--delay must be a number of seconds, got [5]"),
        (
            str(MAX_DELAY_S + 1),
            None,
            f"--delay {MAX_DELAY_S + 1} is longer than the 7 days a job may wait",
        ),
        (None, "2026-11-30T13:00:00", "--not-before '2026-11-30T13:00:00' has no timezone"),
        (None, "2026-12-01", "--not-before '2026-12-01' has no timezone"),
        (None, "tomorrow", "--not-before must be an ISO 8601 time with a timezone"),
        (None, 1764504000, "--not-before must be an ISO 8601 time with a timezone"),
        (None, "2026-12-07T12:00:01Z", "is further ahead than the 7 days a job may wait"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_option(
    delay: object, not_before: object, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(delay, not_before, names=("--delay", "--not-before"), now=NOW)


def test_the_canonical_form_names_the_request_not_the_instant() -> None:
    """A retry of `?delay=60` a second later is the same request (same fingerprint part)."""
    first = parse_schedule("60", None, now=NOW)
    retry = parse_schedule("60.0", None, now=NOW + timedelta(seconds=1))
    assert first is not None and retry is not None
    assert first.canonical == retry.canonical == "delay=60.0"
    utc = parse_schedule(None, "2026-11-30T13:00:00Z", now=NOW)
    offset = parse_schedule(None, "2026-11-30T14:00:00+01:00", now=NOW)
    assert utc is not None and offset is not None
    assert utc.canonical == offset.canonical == "not_before=2026-11-30T13:00:00.000000+00:00"


def test_the_schedule_is_part_of_the_fingerprint_and_absent_keeps_the_old_one() -> None:
    base = fingerprint("t", 1, None, b"{}")
    assert fingerprint("t", 1, None, b"{}", None) == base  # bindings made before upgrading
    prints = {
        base,
        fingerprint("t", 1, None, b"{}", "delay=60.0"),
        fingerprint("t", 1, None, b"{}", "delay=61.0"),
        fingerprint("t", 1, None, b"{}", "not_before=2026-11-30T13:00:00.000000+00:00"),
    }
    assert len(prints) == 4
    assert fingerprint("t", 1, None, b"{}", "delay=60.0") == fingerprint(
        "t", 1, None, b"{}", "delay=60.0"
    )


async def test_scheduled_never_replaces_a_state_and_keeps_its_not_before() -> None:
    store = MemoryStatusStore()
    due = NOW + timedelta(minutes=5)
    await store.record("a", JobState.RUNNING, attempts=1)
    kept = await store.record("a", JobState.SCHEDULED, job_type="t", not_before=due)
    assert (kept.state, kept.attempts, kept.job_type, kept.not_before) == (
        JobState.RUNNING,
        1,
        "t",
        due,
    )
    await store.record("b", JobState.SUCCEEDED)
    assert (await store.record("b", JobState.SCHEDULED)).state is JobState.SUCCEEDED
    fresh = await store.record("c", JobState.SCHEDULED, not_before=due)
    assert (fresh.state, fresh.not_before) == (JobState.SCHEDULED, due)
    started = await store.record("c", JobState.RUNNING, attempts=1)
    assert (started.state, started.not_before) == (JobState.RUNNING, due)


@pytest.mark.parametrize("waiting", [JobState.PENDING, JobState.SCHEDULED, None])
async def test_cancelling_a_job_not_started_settles_it_at_once(waiting: JobState | None) -> None:
    store = MemoryStatusStore()
    if waiting is not None:
        await store.record("j", waiting, not_before=NOW)
    asked, status = await cancel_job(store, "j")
    assert (asked, status.state) == (True, JobState.CANCELLED)
    assert await store.cancelled(["j"]) == {"j"}
    # The ingress's late `scheduled` (a cancel raced its write) does not revive it.
    assert (await store.record("j", JobState.SCHEDULED)).state is JobState.CANCELLED


async def test_cancelling_a_running_job_asks_and_an_ended_one_does_not() -> None:
    store = MemoryStatusStore()
    await store.record("run", JobState.RUNNING)
    asked, status = await cancel_job(store, "run")
    assert (asked, status.state, await store.cancelled(["run"])) == (
        True,
        JobState.RUNNING,
        {"run"},
    )
    await store.record("done", JobState.SUCCEEDED)
    asked, status = await cancel_job(store, "done")
    assert (asked, status.state, await store.cancelled(["done"])) == (
        False,
        JobState.SUCCEEDED,
        set(),
    )
