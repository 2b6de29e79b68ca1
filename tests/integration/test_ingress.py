"""The HTTP ingress, job status and cancellation against real Kafka and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from consumer import Settings
from consumer._run import open_status
from consumer.kafka import read_topics
from jobstream._ingress import create_app
from tests.apps.recorder import app
from tests.conftest import REDIS_URL
from tests.support import read_sink, routed_topic, running_worker

pytestmark = pytest.mark.integration


def make_settings(topic: str, group: str, monkeypatch, **ingress: object) -> Settings:
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.record": topic}))
    return Settings(
        worker={"group": group, "commit_interval_s": 0.2},
        retry={
            "tiers_s": [0.3],
            "policy": {"max_attempts": 2, "initial_delay_s": 0.3, "jitter": 0},
        },
        status={
            "backend": "redis",
            "url": REDIS_URL,
            "namespace": f"t{uuid.uuid4().hex[:8]}",
            "cancel_poll_s": 0.1,
        },
        ingress=ingress,
    )


@contextlib.asynccontextmanager
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    status = await open_status(settings)
    assert status is not None
    web = create_app(settings, status)
    transport = httpx.ASGITransport(app=web)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as http:
            yield http
    finally:
        await status.close()


async def state_of(
    http: httpx.AsyncClient, job_id: str, wanted: str, timeout_s: float = 30
) -> dict:
    seen = []
    for _ in range(int(timeout_s * 20)):
        response = await http.get(f"/v1/jobs/{job_id}")
        body = response.json() if response.status_code == 200 else {}
        if not seen or seen[-1] != body.get("state"):
            seen.append(body.get("state"))
        if body.get("state") == wanted:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {wanted}; states seen: {seen}")


async def test_submitted_job_runs_and_its_status_says_so(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(tmp_path / "sink"))
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch)
    async with client(settings) as http, running_worker(app, settings):
        response = await http.post("/v1/jobs/test.record?key=k1", json={"seq": 1, "key": "k1"})
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert (
            response.headers["location"]
            == accepted["status_url"]
            == f"/v1/jobs/{accepted['job_id']}"
        )
        assert accepted["state"] == "pending"
        final = await state_of(http, accepted["job_id"], "succeeded")
    assert final["attempts"] == 1 and final["job_type"] == "test.record"
    assert [line.job_id for line in read_sink(tmp_path / "sink")] == [accepted["job_id"]]


async def test_invalid_payload_is_400_with_fields_and_nothing_is_published(
    new_topic, group_id, monkeypatch
) -> None:
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch)
    async with client(settings) as http:
        response = await http.post("/v1/jobs/test.record", json={"seq": "one", "extra": 1})
        unknown = await http.post("/v1/jobs/no.such.type", json={})
        not_json = await http.post("/v1/jobs/test.record", content=b"{nope")
    assert response.status_code == 400
    assert {f["field"] for f in response.json()["fields"]} == {"seq", "key", "extra"}
    assert unknown.status_code == 404 and "test.record" in unknown.json()["known_types"]
    assert not_json.status_code == 400
    assert await read_topics(settings, [topic]) == []


async def test_body_over_the_limit_is_413(new_topic, group_id, monkeypatch) -> None:
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch, max_body_bytes=64)
    async with client(settings) as http:
        response = await http.post("/v1/jobs/test.record", json={"seq": 1, "key": "k" * 100})
    assert response.status_code == 413
    assert await read_topics(settings, [topic]) == []


async def test_broker_down_is_503_with_retry_after(group_id, monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    settings = make_settings("t-unused", group_id, monkeypatch, retry_after_s=7)
    unreachable = {"bootstrap_servers": f"127.0.0.1:{closed}", "connect_timeout_s": 1.0}
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update=unreachable)})
    async with client(settings) as http:
        response = await http.post("/v1/jobs/test.record", json={"seq": 1, "key": "k"})
        ready = await http.get("/readyz")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert f"127.0.0.1:{closed}" in response.json()["error"]
    assert ready.status_code == 503


async def test_bearer_token_is_required_when_configured(new_topic, group_id, monkeypatch) -> None:
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch, auth_token="s3cret")
    async with client(settings) as http:
        missing = await http.post("/v1/jobs/test.record", json={"seq": 1, "key": "k"})
        wrong = await http.get("/v1/jobs/x", headers={"Authorization": "Bearer nope"})
        right = await http.post(
            "/v1/jobs/test.record",
            json={"seq": 1, "key": "k"},
            headers={"Authorization": "Bearer s3cret"},
        )
        probe = await http.get("/livez")
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 202)
    assert probe.status_code == 200, "probes need no token"
    assert len(await read_topics(settings, [topic])) == 1


async def test_idempotency_key_returns_the_same_job_and_publishes_once(
    new_topic, group_id, monkeypatch
) -> None:
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch)
    headers = {"Idempotency-Key": "order-42"}
    async with client(settings) as http:
        first = await http.post(
            "/v1/jobs/test.record", json={"seq": 1, "key": "k"}, headers=headers
        )
        again = await http.post(
            "/v1/jobs/test.record", json={"seq": 1, "key": "k"}, headers=headers
        )
        other = await http.post(
            "/v1/jobs/test.record",
            json={"seq": 2, "key": "k"},
            headers={"Idempotency-Key": "order-43"},
        )
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"] != other.json()["job_id"]
    records = await read_topics(settings, [topic])
    assert sorted(r.job_id for r in records) == sorted(
        [first.json()["job_id"], other.json()["job_id"]]
    )


async def test_status_follows_a_retried_and_a_dead_lettered_job(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(tmp_path / "sink"))
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch)
    async with client(settings) as http, running_worker(app, settings):
        retried = (
            await http.post(
                "/v1/jobs/test.record", json={"seq": 1, "key": "a", "behaviour": "fail-once"}
            )
        ).json()
        dead = (
            await http.post(
                "/v1/jobs/test.record", json={"seq": 2, "key": "b", "behaviour": "raise"}
            )
        ).json()
        await state_of(http, retried["job_id"], "retrying")
        done = await state_of(http, retried["job_id"], "succeeded")
        failed = await state_of(http, dead["job_id"], "dead_lettered")
    assert done["attempts"] == 2 and "fails on attempt 1" in done["last_error"]
    assert failed["attempts"] == 2 and failed["reason"] == "retries-exhausted"
    assert failed["last_error"] == "RuntimeError: job 2 always fails"


async def test_cancel_before_start_and_while_running(
    new_topic, group_id, tmp_path, monkeypatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await routed_topic(new_topic)
    settings = make_settings(topic, group_id, monkeypatch)
    async with client(settings) as http:
        early = (await http.post("/v1/jobs/test.record", json={"seq": 1, "key": "a"})).json()
        cancelled = await http.post(f"/v1/jobs/{early['job_id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        slow = (
            await http.post(
                "/v1/jobs/test.record", json={"seq": 2, "key": "b", "behaviour": "wait-cancel"}
            )
        ).json()
        async with running_worker(app, settings):
            await state_of(http, slow["job_id"], "running")
            assert (await http.post(f"/v1/jobs/{slow['job_id']}/cancel")).status_code == 202
            final = await state_of(http, slow["job_id"], "cancelled")
            again = await http.post(f"/v1/jobs/{slow['job_id']}/cancel")
    assert again.status_code == 409
    assert final["state"] == "cancelled"
    runs = read_sink(sink, None)
    assert not [line for line in runs if line.job_id == early["job_id"]], (
        "the early job never started"
    )
    assert [line.outcome for line in runs if line.job_id == slow["job_id"]] == [
        "start",
        "cancel-seen",
    ]
