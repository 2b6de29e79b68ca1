"""Issue 13, K1, the kind: `decide` and `failure_details` never raise on what a record or a
handler's exception holds, and the details they write are bounded by bytes, so a retry
record always encodes under `schemas.MAX_HEADER_BYTES`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer import Retry
from consumer.core import (
    Decision,
    Delivery,
    JobRun,
    RetrySettings,
    decide,
    failure_details,
    first_failure_stamp,
)
from schemas import MAX_HEADER_BYTES, JobAttributes, encode, to_kafka
from tests.apps.hostile import HostileJob, UnprintableError

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SETTINGS = RetrySettings.model_validate(
    {"policy": {"max_attempts": 5, "initial_delay_s": 2.0, "jitter": 0, "budget_s": 3600}}
)


def run_of(**extensions: str) -> JobRun:
    attributes = encode(HostileJob(behaviour="fail"), source="/t").attributes
    attributes = attributes.with_extensions(**extensions)
    return JobRun(Delivery("p0", 7, "jobs.t", attributes, b"{}"), None, None, None)


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (float("nan"), Decision(retry=True, delay_s=2.0, reason="retry-requested")),
        ("soon", Decision(retry=True, delay_s=2.0, reason="retry-requested")),
        (True, Decision(retry=True, delay_s=2.0, reason="retry-requested")),
        (-5.0, Decision(retry=True, delay_s=0.0, reason="retry-requested")),
        (1e12, Decision(retry=False, delay_s=0.0, reason="retry-budget-exhausted")),
        (float("inf"), Decision(retry=False, delay_s=0.0, reason="retry-budget-exhausted")),
        (10**400, Decision(retry=False, delay_s=0.0, reason="retry-budget-exhausted")),
        (30, Decision(retry=True, delay_s=30.0, reason="retry-requested")),
    ],
)
def test_any_requested_delay_is_a_decision(delay: object, expected: Decision) -> None:
    error = Retry(delay_s=delay)  # type: ignore[arg-type] - a handler can pass anything
    assert decide(run_of(), error, SETTINGS, now=NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-01T00:00:00",
        "yesterday",
        "9999-12-31T23:59:59",
        # In range as written, out of range in UTC: astimezone overflows.
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59-14:00",
    ],
)
def test_an_unreadable_first_failure_counts_from_now_and_is_rewritten(value: str) -> None:
    run = run_of(jobfirstfail=value)
    decision = decide(run, RuntimeError("x"), SETTINGS, now=NOW)
    assert decision == Decision(retry=True, delay_s=2.0, reason="error")
    details = failure_details(run, RuntimeError("x"), decision, "g", NOW)
    assert details["jobfirstfail"] == "2026-01-02T03:04:05.000000Z"
    assert first_failure_stamp(run, NOW) == "2026-01-02T03:04:05.000000Z"


def test_a_first_failure_past_the_budget_dead_letters() -> None:
    old = (NOW - timedelta(hours=2)).isoformat()
    decision = decide(run_of(jobfirstfail=old), RuntimeError("x"), SETTINGS, now=NOW)
    assert decision.reason == "retry-budget-exhausted"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("\N{GRINNING FACE}" * 3000),
        RuntimeError("bad \udcff text \ud800\n\x00" * 2000),
        RuntimeError("x" * 10_000_000),
        UnprintableError(),
        RuntimeError(b"bytes"),
    ],
)
def test_failure_details_are_bounded_by_bytes_and_a_retry_record_encodes(
    error: Exception,
) -> None:
    run = run_of(jobsrctopic="t" * 50_000)
    decision = decide(run, error, SETTINGS, now=NOW)
    details = failure_details(run, error, decision, "g", NOW)
    assert len(details["joberror"].encode()) <= 1000
    assert len(details["jobtraceback"].encode()) <= 4000
    assert len(details["jobsrctopic"].encode()) <= 256
    attributes = run.attributes
    assert isinstance(attributes, JobAttributes)
    retried = attributes.replace(attempt=2, not_before=NOW).with_extensions(**details)
    key, headers = to_kafka(retried)  # raises InvalidAttributes past the limit
    assert len(key or b"") + sum(len(n) + len(v) for n, v in headers) <= MAX_HEADER_BYTES


def test_an_unprintable_exception_is_named_by_its_type() -> None:
    run = run_of()
    details = failure_details(
        run, UnprintableError(), decide(run, UnprintableError(), SETTINGS, now=NOW), "g", NOW
    )
    assert details["joberror"] == "<unprintable UnprintableError: its __str__ raised>"
    assert details["joberrortype"] == "tests.apps.hostile.UnprintableError"
