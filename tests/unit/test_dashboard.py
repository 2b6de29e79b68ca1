"""The dashboard without a browser or a broker: the status store's history, index and
workers' reports (memory store), and the pages' sign-in, read-only refusal, escaping and
bounds over the ASGI app."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis.asyncio as redis

from consumer import Settings
from consumer.stores import (
    Attempt,
    JobQuery,
    JobState,
    MemoryStatusStore,
    PartitionBacklog,
    WorkerReport,
)
from consumer.stores._status_redis import RedisStatusStore
from jobstream import _dlq
from jobstream._ingress import create_app
from jobstream.ui import create_ui_app
from schemas import examples  # noqa: F401 - registers job types: dead-letter destinations

TOKEN = "unit-token"
XSS = "<script>alert(1)</script>"


def now() -> datetime:
    return datetime.now(UTC)


async def test_history_keeps_each_attempt_and_a_replay_as_new_rows() -> None:
    store = MemoryStatusStore()
    for attempt, outcome in ((1, JobState.RETRYING), (2, JobState.DEAD_LETTERED)):
        await store.record(
            "j", JobState.RUNNING, history_entry=Attempt(attempt=attempt, started_at=now())
        )
        await store.record(
            "j",
            outcome,
            history_entry=Attempt(attempt=attempt, ended_at=now(), outcome=outcome, error="E"),
        )
    # The replay: attempt 1 again. `running` does not replace the final state, but the
    # attempt is history all the same.
    await store.record("j", JobState.RUNNING, history_entry=Attempt(attempt=1, started_at=now()))
    assert (await store.get("j")).state is JobState.DEAD_LETTERED  # type: ignore[union-attr]
    await store.record(
        "j",
        JobState.SUCCEEDED,
        history_entry=Attempt(attempt=1, ended_at=now(), outcome=JobState.SUCCEEDED),
    )
    found = await store.get("j")
    assert found is not None and found.state is JobState.SUCCEEDED
    assert [(a.attempt, a.outcome) for a in found.history] == [
        (1, JobState.RETRYING),
        (2, JobState.DEAD_LETTERED),
        (1, JobState.SUCCEEDED),
    ]
    assert all(a.started_at is not None and a.ended_at is not None for a in found.history)
    assert found.history[2].error is None  # the replayed attempt did not inherit an error


async def test_job_list_filters_pages_and_is_bounded() -> None:
    store = MemoryStatusStore()
    for index in range(30):
        state = JobState.SUCCEEDED if index % 3 else JobState.DEAD_LETTERED
        await store.record(f"j{index:02}", state, job_type="t", key=f"k{index % 2}")
    first = await store.list_jobs(JobQuery(state=JobState.DEAD_LETTERED, limit=4))
    assert [job.job_id for job in first.jobs] == ["j27", "j24", "j21", "j18"]  # newest first
    assert first.next_cursor is not None
    second = await store.list_jobs(
        JobQuery(state=JobState.DEAD_LETTERED, limit=4, cursor=first.next_cursor)
    )
    assert [job.job_id for job in second.jobs] == ["j15", "j12", "j09", "j06"]
    keyed = await store.list_jobs(JobQuery(key="k1", job_type="t", limit=500))
    assert len(keyed.jobs) == 15 and keyed.next_cursor is None and keyed.scanned == 30
    assert (await store.list_jobs(JobQuery(limit=10_000))).jobs.__len__() == 30


async def test_workers_reports_expire_and_recent_is_by_last_change() -> None:
    store = MemoryStatusStore()
    report = WorkerReport(
        worker="w1",
        group="g",
        transport="kafka",
        in_flight=2,
        reported_at=now(),
        backlog=(PartitionBacklog(destination="t", partition="0", messages=5),),
    )
    await store.report_worker(report)
    assert await store.workers() == [report]
    await store.record("old", JobState.SUCCEEDED)
    since = now()
    await store.record("new", JobState.SUCCEEDED)
    assert [job.job_id for job in await store.recent(since)] == ["new"]
    assert len(await store.recent(since - timedelta(minutes=1))) == 2


@pytest.fixture
async def store() -> MemoryStatusStore:
    store = MemoryStatusStore()
    await store.record(
        "job-1",
        JobState.RUNNING,
        job_type="email.welcome",
        key=f"key {XSS}",
        history_entry=Attempt(attempt=1, started_at=now(), worker="w1"),
    )
    await store.record(
        "job-1",
        JobState.RETRYING,
        last_error=f"ValueError: {XSS}",
        history_entry=Attempt(
            attempt=1,
            ended_at=now(),
            outcome=JobState.RETRYING,
            error=f"ValueError: {XSS}",
            traceback=f"Traceback\n  {XSS}",
        ),
    )
    return store


def dashboard(store: MemoryStatusStore, **ui: object) -> httpx.AsyncClient:
    settings = Settings(transport="memory", ingress={"auth_token": TOKEN}, ui=ui)
    transport = httpx.ASGITransport(app=create_ui_app(settings, store))
    return httpx.AsyncClient(transport=transport, base_url="http://ui")


@pytest.fixture
async def signed_in(store: MemoryStatusStore) -> AsyncIterator[httpx.AsyncClient]:
    async with dashboard(store) as http:
        response = await http.post("/ui/login", data={"token": TOKEN, "next": "/ui/live"})
        assert response.status_code == 303 and response.headers["location"] == "/ui/live"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert TOKEN not in cookie  # an HMAC of the token, not the token
        yield http


async def test_pages_need_sign_in_and_refuse_a_wrong_token(store: MemoryStatusStore) -> None:
    async with dashboard(store) as http:
        page = await http.get("/ui/jobs/job-1")
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=/ui/jobs/job-1"
        wrong = await http.post("/ui/login", data={"token": "nope"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        http.cookies.set("jobstream_ui", TOKEN)  # the token itself is not the session
        forged = await http.get("/ui/jobs")
        assert forged.status_code == 303
        http.cookies.clear()
        action = await http.post("/ui/jobs/job-1/cancel")
        assert action.status_code == 401
        panel = await http.get("/ui/live/panel", headers={"HX-Request": "true"})
        assert panel.status_code == 401 and panel.headers["hx-redirect"] == "/ui/login"
        elsewhere = await http.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/ui"})
        assert elsewhere.headers["location"] == "/ui/jobs"  # no open redirect


async def test_untrusted_values_are_escaped(signed_in: httpx.AsyncClient) -> None:
    for path in (
        "/ui/jobs/job-1",
        "/ui/jobs",
        "/ui/jobs?key=key+%3Cscript%3Ealert(1)%3C/script%3E",
    ):
        page = await signed_in.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text, path
    missing = await signed_in.get("/ui/jobs", params={"q": XSS})
    assert XSS not in missing.text and "&lt;script&gt;" in missing.text


async def test_read_only_hides_and_refuses_cancel_and_replay(store: MemoryStatusStore) -> None:
    async with dashboard(store, read_only=True) as http:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        page = await http.get("/ui/jobs/job-1", headers=headers)
        assert page.status_code == 200 and 'id="cancel"' not in page.text
        cancel = await http.post("/ui/jobs/job-1/cancel", headers=headers)
        replay = await http.post(
            "/ui/dead-letters/replay", headers=headers, data={"type": "t", "confirm": "yes"}
        )
        assert (cancel.status_code, replay.status_code) == (403, 403)
    assert await store.cancelled(["job-1"]) == set()
    assert (await store.get("job-1")).state is JobState.RETRYING  # type: ignore[union-attr]


async def test_cancel_from_the_dashboard(
    signed_in: httpx.AsyncClient, store: MemoryStatusStore
) -> None:
    page = await signed_in.get("/ui/jobs/job-1")
    assert 'id="cancel"' in page.text
    answer = await signed_in.post("/ui/jobs/job-1/cancel")
    assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/jobs/job-1")
    assert await store.cancelled(["job-1"]) == {"job-1"}


async def test_job_list_pages_are_bounded_by_page_size(store: MemoryStatusStore) -> None:
    for index in range(7):
        await store.record(f"many-{index}", JobState.SUCCEEDED, job_type="t")
    async with dashboard(store, page_size=3) as http:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        page = await http.get("/ui/jobs", params={"state": "succeeded"}, headers=headers)
        assert page.text.count('href="/ui/jobs/many-') == 3
        assert "many-6" in page.text and "many-4" in page.text and "many-3" not in page.text
        assert 'id="next-page"' in page.text


async def test_live_panel_counts_outcomes_and_reports(
    signed_in: httpx.AsyncClient, store: MemoryStatusStore
) -> None:
    await store.report_worker(
        WorkerReport(
            worker="w1",
            group="g",
            transport="kafka",
            in_flight=3,
            reported_at=now(),
            backlog=(
                PartitionBacklog(destination="jobs.t", partition="0", messages=7),
                PartitionBacklog(
                    destination="jobs.t.retry.1", partition="0", messages=2, tier=True
                ),
            ),
        )
    )
    panel = await signed_in.get("/ui/live/panel")
    assert panel.status_code == 200
    assert '<strong id="in-flight">3</strong>' in panel.text
    assert "<td>jobs.t</td><td>0</td><td>7</td>" in panel.text
    assert "<td>jobs.t.retry.1</td><td>2</td>" in panel.text
    live = await signed_in.get("/ui/live")
    assert 'hx-trigger="every 2s"' in live.text or "htmx" not in live.text


async def test_an_action_from_another_origin_is_refused(
    signed_in: httpx.AsyncClient, store: MemoryStatusStore
) -> None:
    """A page of another port on the same host is the same *site*, so `SameSite=Strict`
    sends the cookie: the origin check refuses its forms (found by a new user's CSRF test:
    a page on another port cancelled a job)."""
    for headers in (
        {"Origin": "http://ui:18799"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
    ):
        cancel = await signed_in.post("/ui/jobs/job-1/cancel", headers=headers)
        replay = await signed_in.post(
            "/ui/dead-letters/replay", headers=headers, data={"type": "t", "confirm": "yes"}
        )
        assert (cancel.status_code, replay.status_code) == (403, 403), headers
    assert await store.cancelled(["job-1"]) == set()
    own = await signed_in.post(
        "/ui/jobs/job-1/cancel", headers={"Origin": "http://ui", "Sec-Fetch-Site": "same-origin"}
    )
    assert own.status_code == 303
    assert await store.cancelled(["job-1"]) == {"job-1"}


async def test_without_a_token_another_origin_cannot_act_either(store: MemoryStatusStore) -> None:
    settings = Settings(transport="memory")
    transport = httpx.ASGITransport(app=create_ui_app(settings, store))
    async with httpx.AsyncClient(transport=transport, base_url="http://ui") as http:
        forged = await http.post("/ui/jobs/job-1/cancel", headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
    assert await store.cancelled(["job-1"]) == set()


async def test_an_unknown_destination_matches_no_dead_letter(
    signed_in: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay filtered by a destination that does not exist replayed every dead letter
    (the filter fell back to all destinations): it now reads none."""
    assert _dlq.default_destinations(Settings(transport="memory"))  # (schemas.examples)
    asked: list[list[str]] = []

    async def find(settings: object, destinations: list[str], where: object) -> list[object]:
        asked.append(destinations)
        return []

    monkeypatch.setattr(_dlq, "find", find)
    page = await signed_in.get("/ui/dead-letters", params={"destination": "no.such.dlq"})
    replay = await signed_in.post(
        "/ui/dead-letters/replay", data={"destination": "no.such.dlq", "confirm": "yes"}
    )
    assert (page.status_code, replay.status_code) == (200, 200)
    assert asked == []  # nothing read, so nothing can be replayed
    await signed_in.get("/ui/dead-letters")
    assert asked and asked[-1]  # no filter: every known destination


async def test_bad_query_parameters_get_a_page_not_a_500(signed_in: httpx.AsyncClient) -> None:
    for cursor in ("99999999999999999999999999", "²", "-1", "1e400", "abc"):
        page = await signed_in.get("/ui/jobs", params={"cursor": cursor})
        assert page.status_code == 200, cursor
    bogus = await signed_in.get("/ui/jobs", params={"state": "bogus"})
    assert bogus.status_code == 400 and "succeeded" in bogus.text


async def test_a_status_store_that_is_away_gets_503_with_retry_after() -> None:
    """Found by a new user: a status store that refused connections made every page and
    `GET /v1/jobs/{id}` answer a bare 500."""
    client = redis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=2)
    away = RedisStatusStore(client, "t", 600)
    settings = Settings(transport="memory", ingress={"auth_token": TOKEN})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for app, path in (
        (create_ui_app(settings, away), "/ui/jobs"),
        (create_ui_app(settings, away), "/ui/jobs/abc"),
        (create_app(settings, away), "/v1/jobs/abc"),
        (create_app(settings, away), "/ui/live/panel"),
    ):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ui") as http:
            answer = await http.get(path, headers=headers)
        assert answer.status_code == 503, path
        assert answer.headers["retry-after"] == "5", path
        assert "the status store is unavailable" in answer.text, path
    await client.aclose()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
