"""`POST /v1/jobs/{type}?delay=S` / `?not_before=ISO` (issue 15) on the memory broker: the
record carries the time, the status is `scheduled` with its `not_before` until a worker
starts the job (never before it), a cancelled scheduled job never runs, bad values are 400s
that publish nothing, and the schedule is part of the `Idempotency-Key` fingerprint.

The ingress is driven through httpx's ASGI transport (as in test_ingress_submit.py); the
workers are `TestApp`'s, on the same memory broker and status store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from consumer import App, JobContext
from consumer.core import Outcome, Settings
from consumer.memory import TestApp
from consumer.stores import JobState, JobStatus, MemoryStatusStore, StatusStore
from jobstream._ingress import create_app
from producer.memory import BROKER
from schemas import Job, JobRegistry


class Reminder(Job, type="test.ingress.reminder", version=1, register=False):
    n: int


REGISTRY = JobRegistry([Reminder])
PATH = "/v1/jobs/test.ingress.reminder"
LATE_S = 0.5  # the memory broker has no network: lateness is scheduling noise only


@pytest.fixture
def topic() -> Iterator[str]:
    name = f"ingress-scheduled-{uuid.uuid4().hex[:8]}"
    BROKER.create_topic(name)
    yield name
    BROKER.faults.reset()


def settings_for(topic: str) -> Settings:
    return Settings(
        transport="memory",
        routing={"routes": {"test.ingress.reminder": topic}},
        status={"backend": "memory"},
    )


def client(settings: Settings, store: StatusStore) -> httpx.AsyncClient:
    web = create_app(settings, store, registry=REGISTRY)
    transport = httpx.ASGITransport(app=web, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ingress")


def stored(topic: str) -> dict[str, datetime | None]:
    """Job id -> `not_before` (`ce_jobnotbefore`) of every record the broker holds."""
    found: dict[str, datetime | None] = {}
    for partition in range(BROKER.partitions(topic)):
        for record in BROKER.read(topic, partition, 0, 10_000):
            headers = dict(record.headers)
            raw = headers.get("ce_jobnotbefore")
            found[headers["ce_id"].decode()] = (
                datetime.fromisoformat(raw.decode()) if raw is not None else None
            )
    return found


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- the ingress alone -------------------------------------------------------------------


async def test_delay_is_published_and_shown_as_scheduled_with_its_not_before(topic: str) -> None:
    store = MemoryStatusStore()
    async with client(settings_for(topic), store) as http:
        before = datetime.now(UTC)
        answer = await http.post(PATH, json={"n": 1}, params={"delay": "90"})
        after = datetime.now(UTC)
        job_id = answer.json()["job_id"]
        status = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert (answer.status_code, answer.json()["state"]) == (202, "scheduled"), answer.text
    assert status["state"] == "scheduled"
    not_before = moment(status["not_before"])
    assert before + timedelta(seconds=90) <= not_before <= after + timedelta(seconds=90)
    assert stored(topic) == {job_id: not_before}  # the status shows what the record carries


async def test_not_before_is_published_as_given_in_utc(topic: str) -> None:
    at = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    store = MemoryStatusStore()
    async with client(settings_for(topic), store) as http:
        answer = await http.post(PATH, json={"n": 2}, params={"not_before": at.isoformat()})
    job_id = answer.json()["job_id"]
    assert (answer.status_code, answer.json()["state"]) == (202, "scheduled")
    assert stored(topic) == {job_id: at}
    recorded = await store.get(job_id)
    assert recorded is not None
    assert (recorded.state, recorded.not_before) == (JobState.SCHEDULED, at)


@pytest.mark.parametrize(
    "params",
    [{"delay": "0"}, {"not_before": "2020-01-01T00:00:00Z"}, {}],
    ids=["delay-0", "past", "none"],
)
async def test_a_job_due_now_is_pending(topic: str, params: dict[str, str]) -> None:
    store = MemoryStatusStore()
    async with client(settings_for(topic), store) as http:
        answer = await http.post(PATH, json={"n": 3}, params=params)
    assert (answer.status_code, answer.json()["state"]) == (202, "pending")
    recorded = await store.get(answer.json()["job_id"])
    assert recorded is not None and recorded.state is JobState.PENDING


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"delay": "5", "not_before": "2030-01-01T00:00:00Z"},
            "give delay or not_before, not both",
        ),
        ({"delay": "-1"}, "delay must be a finite number of seconds >= 0, got '-1'"),
        ({"delay": "NaN"}, "delay must be a finite number of seconds >= 0, got 'NaN'"),
        ({"delay": "inf"}, "delay must be a finite number of seconds >= 0, got 'inf'"),
        ({"delay": ""}, "delay must be a number of seconds (e.g. 30 or 2.5), got ''"),
        ({"delay": "5s"}, "delay must be a number of seconds (e.g. 30 or 2.5), got '5s'"),
        ({"delay": "604801"}, "delay 604801 is longer than the 7 days a job may wait"),
        (
            {"not_before": "2030-01-01T00:00:00"},
            "not_before '2030-01-01T00:00:00' has no timezone: add one",
        ),
        ({"not_before": "soon"}, "not_before must be an ISO 8601 time with a timezone"),
        (
            {"not_before": "2030-01-01T10:00:00+01:00"},  # httpx sends the + as %2B: decoded
            "not_before 2030-01-01T10:00:00+01:00 is further ahead than the 7 days",
        ),
        (
            {"not_before": "2099-01-01T00:00:00Z"},
            "not_before 2099-01-01T00:00:00Z is further ahead than the 7 days a job may wait",
        ),
    ],
)
async def test_a_bad_schedule_is_400_and_publishes_nothing(
    topic: str, params: dict[str, str], message: str
) -> None:
    store = MemoryStatusStore()
    headers = {"Idempotency-Key": "bad-schedule"}
    async with client(settings_for(topic), store) as http:
        answer = await http.post(PATH, json={"n": 4}, params=params, headers=headers)
        fixed = await http.post(PATH, json={"n": 4}, params={"delay": "5"}, headers=headers)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]
    # Refused before anything was reserved: the key is free for the corrected request.
    assert fixed.status_code == 202, fixed.text
    assert list(stored(topic)) == [fixed.json()["job_id"]]


async def test_an_unencoded_plus_in_the_offset_gets_a_hint(topic: str) -> None:
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        answer = await http.post(f"{PATH}?not_before=2030-01-01T10:00:00+01:00", json={"n": 1})
    assert answer.status_code == 400
    assert answer.json()["error"].endswith(
        "got '2030-01-01T10:00:00 01:00'; in a URL, send the + of the offset as %2B"
    )
    assert stored(topic) == {}


async def test_the_schedule_is_part_of_the_idempotency_fingerprint(topic: str) -> None:
    store = MemoryStatusStore()
    headers = {"Idempotency-Key": "remind-5"}
    async with client(settings_for(topic), store) as http:
        first = await http.post(PATH, json={"n": 5}, params={"delay": "60"}, headers=headers)
        retry = await http.post(PATH, json={"n": 5}, params={"delay": "60.0"}, headers=headers)
        other_delay = await http.post(PATH, json={"n": 5}, params={"delay": "61"}, headers=headers)
        no_delay = await http.post(PATH, json={"n": 5}, headers=headers)
    assert (first.status_code, retry.status_code) == (202, 202)
    assert retry.json()["job_id"] == first.json()["job_id"]
    assert retry.json()["state"] == "scheduled"
    assert (other_delay.status_code, no_delay.status_code) == (422, 422)
    assert "?delay=" in other_delay.json()["error"]
    assert list(stored(topic)) == [first.json()["job_id"]]  # published once


class Unavailable(MemoryStatusStore):
    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus:
        msg = "status store down"
        raise ConnectionError(msg)


async def test_without_the_status_store_the_answer_still_says_scheduled(topic: str) -> None:
    async with client(settings_for(topic), Unavailable()) as http:
        answer = await http.post(PATH, json={"n": 6}, params={"delay": "30"})
    assert (answer.status_code, answer.json()["state"]) == (202, "scheduled")


async def test_the_openapi_document_lists_delay_and_not_before(topic: str) -> None:
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        document = (await http.get("/openapi.json")).json()
    parameters = {
        parameter["name"]: parameter for parameter in document["paths"][PATH]["post"]["parameters"]
    }
    assert parameters["delay"]["in"] == "query"
    assert parameters["delay"]["schema"] == {"type": "number", "minimum": 0}
    assert parameters["not_before"]["schema"] == {"type": "string", "format": "date-time"}
    assert {"version", "key", "Idempotency-Key"} <= parameters.keys()


# -- with workers ------------------------------------------------------------------------


class Runs:
    """An app whose handler records, per job, when it started and the state the status
    store showed then."""

    def __init__(self) -> None:
        self.app = App("scheduled-ingress-test")
        self.store: StatusStore | None = None
        self.started: dict[str, list[tuple[datetime, JobState | None]]] = {}
        self.app.handler(Reminder)(self.handle)

    async def handle(self, job: Reminder, ctx: JobContext) -> None:
        now = datetime.now(UTC)
        assert self.store is not None
        status = await self.store.get(ctx.job_id)
        self.started.setdefault(ctx.job_id, []).append((now, status.state if status else None))


def worker_settings(topic: str) -> Settings:
    return Settings.model_validate(
        {
            "transport": "memory",
            "routing": {"routes": {"test.ingress.reminder": topic}},
            "status": {"backend": "memory", "cancel_poll_s": 0.05},
            "retry": {"tiers_s": [0.2, 0.5]},
        }
    )


async def test_a_delayed_submission_is_scheduled_then_runs_no_earlier_than_not_before(
    topic: str,
) -> None:
    runs = Runs()
    async with TestApp(runs.app, worker_settings(topic), broker=BROKER) as t:
        assert t.status is not None
        runs.store = t.status
        async with client(t.settings, t.status) as http:
            answer = await http.post(PATH, json={"n": 7}, params={"delay": "1"})
            job_id = answer.json()["job_id"]
            waiting = (await http.get(f"/v1/jobs/{job_id}")).json()
            await t.drain(timeout_s=10)
            done = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert (answer.status_code, answer.json()["state"]) == (202, "scheduled")
    assert waiting["state"] == "scheduled"
    not_before = moment(waiting["not_before"])
    [(started, state_then)] = runs.started[job_id]
    assert state_then is JobState.RUNNING
    late = (started - not_before).total_seconds()
    assert 0 <= late <= LATE_S, f"started {late:+.3f}s after not_before"
    assert (done["state"], done["attempts"], done["not_before"]) == (
        "succeeded",
        1,
        waiting["not_before"],
    )
    [settled] = t.settlements(job_id)
    assert (settled.attempt, settled.outcome) == (1, Outcome.COMPLETED)


async def test_a_cancelled_scheduled_job_never_runs(topic: str) -> None:
    runs = Runs()
    async with TestApp(runs.app, worker_settings(topic), broker=BROKER) as t:
        assert t.status is not None
        runs.store = t.status
        async with client(t.settings, t.status) as http:
            cancelled_job = await http.post(PATH, json={"n": 8}, params={"delay": "1"})
            kept_job = await http.post(PATH, json={"n": 9}, params={"delay": "1"})
            cancelled_id, kept_id = cancelled_job.json()["job_id"], kept_job.json()["job_id"]
            cancel = await http.post(f"/v1/jobs/{cancelled_id}/cancel")
            await t.drain(timeout_s=10)
            after = (await http.get(f"/v1/jobs/{cancelled_id}")).json()
            again = await http.post(f"/v1/jobs/{cancelled_id}/cancel")
    assert cancelled_job.json()["state"] == "scheduled"
    assert (cancel.status_code, cancel.json()) == (
        202,
        {"job_id": cancelled_id, "state": "cancelled"},
    )
    assert cancelled_id not in runs.started  # skipped when it came due
    assert [s.outcome for s in t.settlements(cancelled_id)] == [Outcome.CANCELLED]
    assert after["state"] == "cancelled"
    assert again.status_code == 409
    assert list(runs.started) == [kept_id]  # the other delayed job ran


# -- scheduled without the ingress (a producer's publish, the CLI) ------------------------


async def test_a_delayed_publish_shows_scheduled_then_runs_and_a_job_due_now_never_is(
    topic: str,
) -> None:
    """A job published with `delay=` by a producer (no ingress wrote anything) is shown
    `scheduled` with its `not_before` once a worker set it aside, then `running` no earlier
    than its time, then `succeeded`; a job due now is never `scheduled`."""
    runs = Runs()
    async with TestApp(runs.app, worker_settings(topic), broker=BROKER) as t:
        assert t.status is not None
        runs.store = t.status
        delayed = await t.publish(Reminder(n=8), delay=1.2)
        at_once = await t.publish(Reminder(n=9))
        waiting = None
        for _ in range(100):  # the worker records it within a fetch and a 0.25 s round
            waiting = await t.status.get(delayed.job_id)
            if waiting is not None:
                break
            await asyncio.sleep(0.02)
        await t.drain(timeout_s=10)
        done = await t.status.get(delayed.job_id)
        now_done = await t.status.get(at_once.job_id)
    due = stored(topic)[delayed.job_id]
    assert waiting is not None and due is not None
    assert (waiting.state, waiting.not_before, waiting.job_type) == (
        JobState.SCHEDULED,
        due,
        "test.ingress.reminder",
    )
    [(started, seen)] = runs.started[delayed.job_id]
    assert started >= due and seen is JobState.RUNNING
    assert done is not None and done.state is JobState.SUCCEEDED
    assert [seen for _, seen in runs.started[at_once.job_id]] == [JobState.RUNNING]
    assert now_done is not None and now_done.state is JobState.SUCCEEDED
