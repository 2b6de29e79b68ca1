"""`POST /v1/jobs/{type}` against the memory broker (issue 14): a 202 means published, an
`Idempotency-Key` never answers 202 for a job the broker does not hold, and limits are
enforced before the work they protect.

Each test drives the ingress through httpx's ASGI transport (no server) and injects broker
faults with `producer.memory.BROKER.faults`; what the broker holds is read back from it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from consumer import Settings
from consumer.stores import JobState, JobStatus, MemoryStatusStore
from jobstream._ingress import create_app
from producer import PublishTimeout, Receipt
from producer.memory import BROKER, MemoryPublisher
from schemas import MAX_HEADER_BYTES, Job, JobMessage, JobRegistry


class Order(Job, type="test.ingress.order", version=1, register=False):
    order_id: str


REGISTRY = JobRegistry([Order])
PATH = "/v1/jobs/test.ingress.order"


class Gate:
    """Holds the next publish at the broker's door: `entered` once it arrived, and it goes
    on (to the broker and its faults) when `release()` is called."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        self._held = False

    def release(self) -> None:
        self._open.set()

    async def pass_through(self) -> None:
        if self._held:
            return
        self._held = True
        self.entered.set()
        await self._open.wait()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    send = MemoryPublisher.send

    async def gated(self: MemoryPublisher, destination: str, message: JobMessage) -> Receipt:
        await gate.pass_through()
        return await send(self, destination, message)

    monkeypatch.setattr(MemoryPublisher, "send", gated)
    return gate


@pytest.fixture
def topic() -> Iterator[str]:
    name = f"ingress-{uuid.uuid4().hex[:8]}"
    BROKER.create_topic(name)
    yield name
    BROKER.faults.reset()


def settings_for(topic: str, **ingress: Any) -> Settings:
    return Settings(
        transport="memory",
        routing={"routes": {"test.ingress.order": topic}},
        status={"backend": "memory"},
        ingress=ingress,
    )


def client(settings: Settings, store: MemoryStatusStore) -> httpx.AsyncClient:
    web = create_app(settings, store, registry=REGISTRY)
    # Errors the app does not answer become 500s, as a server shows them to the client.
    transport = httpx.ASGITransport(app=web, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://ingress")


def stored_ids(topic: str) -> list[str]:
    """The job id (`ce_id`) of every record the broker holds on `topic`."""
    return [
        dict(record.headers)["ce_id"].decode()
        for partition in range(BROKER.partitions(topic))
        for record in BROKER.read(topic, partition, 0, 10_000)
    ]


async def test_oversized_key_is_400_and_never_binds_a_phantom_job_id(topic: str) -> None:
    store = MemoryStatusStore()
    headers = {"Idempotency-Key": "order-7"}
    async with client(settings_for(topic), store) as http:
        big = {"key": "k" * (17 * 1024)}
        first = await http.post(PATH, json={"order_id": "7"}, params=big, headers=headers)
        retry = await http.post(PATH, json={"order_id": "7"}, params=big, headers=headers)
        fixed = await http.post(
            PATH, json={"order_id": "7"}, params={"key": "order-7"}, headers=headers
        )
        status = await http.get(f"/v1/jobs/{fixed.json().get('job_id')}")
    assert (first.status_code, retry.status_code) == (400, 400), retry.text
    assert str(MAX_HEADER_BYTES) in first.json()["error"]
    assert "?key=" in first.json()["error"]
    assert fixed.status_code == 202, fixed.text
    assert status.status_code == 200 and status.json()["state"] == "pending"
    assert stored_ids(topic) == [fixed.json()["job_id"]]


async def test_concurrent_request_with_the_key_is_409_and_a_failure_leaves_it_retryable(
    topic: str, gate: Gate
) -> None:
    headers = {"Idempotency-Key": "order-8"}
    async with client(settings_for(topic, retry_after_s=2), MemoryStatusStore()) as http:
        first = asyncio.create_task(http.post(PATH, json={"order_id": "8"}, headers=headers))
        await asyncio.wait_for(gate.entered.wait(), 5)  # the first is publishing now
        second = await http.post(PATH, json={"order_id": "8"}, headers=headers)
        BROKER.faults.fail_appends(1)  # then the broker turns out to be down
        gate.release()
        failed = await first
        retry = await http.post(PATH, json={"order_id": "8"}, headers=headers)
        repeat = await http.post(PATH, json={"order_id": "8"}, headers=headers)
    assert second.status_code == 409, second.text
    assert second.headers["retry-after"] == "2"
    assert failed.status_code == 503 and failed.headers["retry-after"] == "2"
    assert (retry.status_code, repeat.status_code) == (202, 202), retry.text
    assert retry.json()["job_id"] == repeat.json()["job_id"]
    assert stored_ids(topic) == [retry.json()["job_id"]]


async def test_publish_timeout_is_503_with_the_job_id_and_the_retry_publishes_that_id(
    topic: str,
) -> None:
    store = MemoryStatusStore()
    headers = {"Idempotency-Key": "order-9"}
    BROKER.faults.fail_appends(1, PublishTimeout("memory", topic, 1.0))
    async with client(settings_for(topic), store) as http:
        timed_out = await http.post(PATH, json={"order_id": "9"}, headers=headers)
        retry = await http.post(PATH, json={"order_id": "9"}, headers=headers)
    assert timed_out.status_code == 503, timed_out.text
    assert "retry-after" in timed_out.headers
    body = timed_out.json()
    assert body["outcome"] == "unknown" and "same Idempotency-Key" in body["error"]
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] == body["job_id"]
    assert stored_ids(topic) == [body["job_id"]]


async def test_a_chunked_body_over_the_limit_is_413_after_reading_little(topic: str) -> None:
    sent = 0

    async def twenty_megabytes() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * 4096
        for _ in range(20 * 1024 * 1024 // len(chunk)):
            sent += len(chunk)
            yield chunk

    async with client(settings_for(topic, max_body_bytes=1000), MemoryStatusStore()) as http:
        response = await http.post(PATH, content=twenty_megabytes())
    assert response.status_code == 413, response.text
    assert "1000" in response.json()["error"]
    assert sent < 64 * 1024, f"{sent} bytes were read to refuse a 1,000-byte limit"
    assert stored_ids(topic) == []


async def test_a_trickling_body_is_408_and_frees_its_slot(topic: str) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"order_id": '
        await asyncio.sleep(30)  # a client that stalls mid-body (slow loris)
        yield b'"1"}'

    settings = settings_for(topic, max_in_flight=1, body_timeout_s=0.3)
    async with client(settings, MemoryStatusStore()) as http:
        stalled = await asyncio.wait_for(http.post(PATH, content=trickle()), 5)
        after = await http.post(PATH, json={"order_id": "2"})  # the only slot is free again
    assert stalled.status_code == 408, stalled.text
    assert "0.3s" in stalled.json()["error"]
    assert after.status_code == 202, after.text
    assert stored_ids(topic) == [after.json()["job_id"]]


async def test_no_free_slot_is_503_before_any_byte_of_the_body_is_read(
    topic: str, gate: Gate
) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        sent += 16
        yield b'{"order_id": "1"}'

    async with client(settings_for(topic, max_in_flight=1), MemoryStatusStore()) as http:
        slow = asyncio.create_task(http.post(PATH, json={"order_id": "0"}))
        await asyncio.wait_for(gate.entered.wait(), 5)  # it holds the only slot
        refused = await http.post(PATH, content=body())
        gate.release()
        assert (await slow).status_code == 202
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert sent == 0, "the body was read although no slot was free"


async def test_a_cancelled_request_leaves_its_key_retryable_under_the_same_job_id(
    topic: str, gate: Gate
) -> None:
    """A client that goes away mid-publish cancels the request: the binding becomes
    `failed`, not a 202 for a job the broker never stored."""
    headers = {"Idempotency-Key": "order-10"}
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        gone = asyncio.create_task(http.post(PATH, json={"order_id": "10"}, headers=headers))
        await asyncio.wait_for(gate.entered.wait(), 5)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.release()
        retry = await http.post(PATH, json={"order_id": "10"}, headers=headers)
    assert retry.status_code == 202, retry.text
    assert stored_ids(topic) == [retry.json()["job_id"]]


async def test_the_same_key_with_another_request_is_422(topic: str) -> None:
    headers = {"Idempotency-Key": "order-11"}
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        first = await http.post(PATH, json={"order_id": "11"}, headers=headers)
        other = await http.post(PATH, json={"order_id": "12"}, headers=headers)
        other_key = await http.post(
            PATH, json={"order_id": "11"}, params={"key": "k"}, headers=headers
        )
        repeat = await http.post(PATH, json={"order_id": "11"}, headers=headers)
    assert first.status_code == 202
    assert (other.status_code, other_key.status_code) == (422, 422), other.text
    assert repeat.status_code == 202 and repeat.json()["job_id"] == first.json()["job_id"]
    assert stored_ids(topic) == [first.json()["job_id"]]


async def test_a_record_over_the_brokers_limit_is_413_and_the_retry_too(topic: str) -> None:
    BROKER.faults.limit_record_bytes(100)
    headers = {"Idempotency-Key": "order-13"}
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        first = await http.post(PATH, json={"order_id": "13"}, headers=headers)
        retry = await http.post(PATH, json={"order_id": "13"}, headers=headers)
    assert (first.status_code, retry.status_code) == (413, 413), retry.text
    assert "over the broker's limit" in first.json()["error"]
    assert stored_ids(topic) == []


async def test_a_missing_topic_is_500_naming_it(topic: str) -> None:
    missing = f"{topic}-missing"
    async with client(settings_for(missing), MemoryStatusStore()) as http:
        response = await http.post(PATH, json={"order_id": "14"})
    assert response.status_code == 500
    assert missing in response.json()["error"] and "topics ensure" in response.json()["error"]


async def test_the_answer_says_whether_the_job_was_spooled(topic: str) -> None:
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        response = await http.post(PATH, json={"order_id": "15"})
    assert response.status_code == 202
    assert response.json()["spooled"] is False
    assert stored_ids(topic) == [response.json()["job_id"]]


class WorkerFirstStore(MemoryStatusStore):
    """Between the publish and the ingress's `pending`, a fast worker writes `running`."""

    async def record(self, job_id: str, state: JobState, **fields: Any) -> JobStatus:
        if state is JobState.PENDING:
            await super().record(job_id, JobState.RUNNING, attempts=1)
        return await super().record(job_id, state, **fields)


async def test_pending_written_after_the_publish_keeps_a_workers_running(topic: str) -> None:
    store = WorkerFirstStore()
    async with client(settings_for(topic), store) as http:
        response = await http.post(PATH, json={"order_id": "16"})
        status = (await http.get(f"/v1/jobs/{response.json()['job_id']}")).json()
    assert response.status_code == 202
    assert response.json()["state"] == "running"
    assert (status["state"], status["attempts"]) == ("running", 1)
    assert status["job_type"] == "test.ingress.order" and status["created_at"] is not None


async def test_a_publish_past_the_ingress_bound_is_a_timeout_and_the_key_is_free_at_once(
    topic: str,
) -> None:
    """The ingress bounds each publish (connect + publish timeout), so a broker that never
    answers cannot keep a reservation beyond its lease: the retry is not a 409."""
    fast = {"connect_timeout_s": 0.1, "publish_timeout_s": 0.2}
    settings = settings_for(topic).model_copy(
        update={
            "kafka": Settings().kafka.model_copy(update=fast),
            "nats": Settings().nats.model_copy(update=fast),
        }
    )
    headers = {"Idempotency-Key": "order-17"}
    BROKER.faults.delay_acks(5)
    async with client(settings, MemoryStatusStore()) as http:
        timed_out = await http.post(PATH, json={"order_id": "17"}, headers=headers)
        BROKER.faults.delay_acks(0)
        retry = await http.post(PATH, json={"order_id": "17"}, headers=headers)
    assert timed_out.status_code == 503, timed_out.text
    assert timed_out.json()["outcome"] == "unknown"
    assert retry.status_code == 202, retry.text
    assert retry.json()["job_id"] == timed_out.json()["job_id"]
    assert stored_ids(topic) == [retry.json()["job_id"]]


async def test_an_empty_idempotency_key_is_400_not_a_new_job_per_retry(topic: str) -> None:
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        answers = [
            await http.post(PATH, json={"order_id": "1"}, headers={"Idempotency-Key": blank})
            for blank in ("", "   ")
        ]
    assert [a.status_code for a in answers] == [400, 400]
    assert "Idempotency-Key" in answers[0].json()["error"]
    assert stored_ids(topic) == []


async def test_readiness_asks_the_broker_and_follows_it(
    topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobstream._ingress_publish.PING_EVERY_S", 0.0)  # no cached answer
    async with client(settings_for(topic), MemoryStatusStore()) as http:
        assert (await http.get("/readyz")).status_code == 200
        BROKER.faults.disconnect()
        down = await http.get("/readyz")
        BROKER.faults.reconnect()
        back = await http.get("/readyz")
    assert down.status_code == 503 and "not ready" in down.text
    assert back.status_code == 200
