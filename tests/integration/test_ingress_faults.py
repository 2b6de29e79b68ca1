"""The ingress against a broker that hangs or dies mid-request (issue 14), on brokers of the
test's own (a private Kafka, a NATS server of its own) and the real Redis status store.

The client sends an `Idempotency-Key`. The broker does not acknowledge: 503 with the job
id and an unknown outcome. The broker comes back; the client retries with the same key and
gets 202 with THE SAME job id. The job is then run (Kafka: by a worker, once, though the
topic may hold the hung request's record too) or stored (NATS: once; JetStream drops the
repeat by its `Nats-Msg-Id`, the job id).
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from consumer import Settings
from consumer.kafka import read_topics
from tests.apps.recorder import app
from tests.integration.test_ingress import client, make_settings, state_of
from tests.integration.test_nats_worker import names, provision
from tests.own_services import OwnServer, PrivateKafka, private_kafka_for_module
from tests.support import read_sink, running_worker

pytestmark = pytest.mark.integration

PATH = "/v1/jobs/test.record"


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    with private_kafka_for_module(tmp_path_factory.mktemp("kafka-run")) as kafka:
        yield kafka


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    yield server
    server.stop(signal.SIGKILL)


async def accepted_retry(
    http: httpx.AsyncClient, body: dict[str, Any], key: str, timeout_s: float = 20
) -> httpx.Response:
    """Retry as a client does (same key) until the ingress answers 202."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await http.post(PATH, json=body, headers={"Idempotency-Key": key})
        if response.status_code == 202 or time.monotonic() > deadline:
            return response
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.5)


def assert_unknown_outcome(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers
    body = response.json()
    assert body["outcome"] == "unknown" and "same Idempotency-Key" in body["error"]
    return str(body["job_id"])


@pytest.mark.timeout(90)
async def test_kafka_hung_mid_request_then_the_retry_gets_the_same_job_id_run_once(
    private_kafka: PrivateKafka, group_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = f"ingress-hung-{uuid.uuid4().hex[:8]}"
    await private_kafka.create_topics([topic, f"{topic}.retry.1", f"{topic}.dlq"])
    settings = make_settings(topic, group_id, monkeypatch)
    kafka = {"bootstrap_servers": private_kafka.bootstrap, "publish_timeout_s": 2.0}
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update=kafka)})
    body = {"seq": 1, "key": "a"}
    async with client(settings) as http:
        warm = await http.post(PATH, json={"seq": 0, "key": "w"})
        assert warm.status_code == 202, warm.text  # the producer is connected
        private_kafka.pause()
        try:
            hung = await http.post(PATH, json=body, headers={"Idempotency-Key": "order-7"})
        finally:
            private_kafka.resume()
        job_id = assert_unknown_outcome(hung)
        retry = await accepted_retry(http, body, "order-7")
        assert retry.status_code == 202, retry.text
        assert retry.json()["job_id"] == job_id
        async with running_worker(app, settings):
            await state_of(http, job_id, "succeeded")
            records = await read_topics(settings, [topic])
            copies = [r.job_id for r in records].count(job_id)
            assert copies in (1, 2), f"{copies} records of {job_id}"
            for _ in range(100):  # the worker has seen every record, duplicates included
                if await private_kafka.committed(group_id, topic) == len(records):
                    break
                await asyncio.sleep(0.1)
            assert await private_kafka.committed(group_id, topic) == len(records)
    runs = [line.job_id for line in read_sink(sink)]
    assert runs.count(job_id) == 1, f"{job_id} ran {runs.count(job_id)} times"
    assert sorted(runs) == sorted([job_id, warm.json()["job_id"]])


async def stream_ids(url: str, stream: str) -> list[str]:
    """The job id of every message `stream` holds, in order."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        ids = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(stream, seq)
            ids.append((message.headers or {})["ce-id"])
        return ids
    finally:
        await client.close()


def nats_settings(url: str, stream: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings = make_settings("unused", "unused", monkeypatch)
    monkeypatch.delenv("JOBSTREAM_ROUTING__ROUTES")
    return settings.model_copy(
        update={
            "transport": "nats",
            "nats": settings.nats.model_copy(
                update={"servers": [url], "publish_timeout_s": 1.0, "connect_timeout_s": 2.0}
            ),
            "routing": settings.routing.model_copy(
                update={"stream": stream, "subject_prefix": f"{prefix}.", "routes": {}}
            ),
        }
    )


@pytest.mark.timeout(60)
async def test_nats_hung_mid_request_then_the_retry_gets_the_same_job_id_stored_once(
    own_server: OwnServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await own_server.start()
    stream, prefix, subject = names("ingress")
    settings = nats_settings(own_server.url, stream, prefix, monkeypatch)
    await provision(own_server.url, settings, subject)
    body = {"seq": 1, "key": "a"}
    async with client(settings) as http:
        warm = await http.post(PATH, json={"seq": 0, "key": "w"})
        assert warm.status_code == 202, warm.text
        own_server.pause()
        try:
            hung = await http.post(PATH, json=body, headers={"Idempotency-Key": "order-7"})
        finally:
            own_server.resume()
        job_id = assert_unknown_outcome(hung)
        retry = await accepted_retry(http, body, "order-7")
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] == job_id
    assert await stream_ids(own_server.url, stream) == [warm.json()["job_id"], job_id]


@pytest.mark.timeout(60)
async def test_nats_killed_mid_request_then_the_retry_after_a_restart_gets_the_same_job_id(
    own_server: OwnServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await own_server.start()
    stream, prefix, subject = names("ingress")
    settings = nats_settings(own_server.url, stream, prefix, monkeypatch)
    await provision(own_server.url, settings, subject)
    body = {"seq": 1, "key": "a"}
    async with client(settings) as http:
        warm = await http.post(PATH, json={"seq": 0, "key": "w"})
        assert warm.status_code == 202, warm.text
        own_server.pause()
        request = asyncio.create_task(
            http.post(PATH, json=body, headers={"Idempotency-Key": "order-8"})
        )
        await asyncio.sleep(0.3)  # the request waits for the hung server's acknowledgement
        own_server.stop(signal.SIGKILL)
        job_id = assert_unknown_outcome(await request)
        await own_server.start()  # same port, same store
        retry = await accepted_retry(http, body, "order-8")
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] == job_id
    assert await stream_ids(own_server.url, stream) == [warm.json()["job_id"], job_id]
