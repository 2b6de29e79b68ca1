"""`JobProducer` on real NATS JetStream, read back with a plain nats-py subscription."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType
from opentelemetry.sdk.trace import TracerProvider

from producer import (
    BrokerUnavailable,
    DestinationMissing,
    JobProducer,
    NatsSettings,
    ProducerSettings,
    PublishRequest,
    RoutingSettings,
    SyncJobProducer,
)
from producer.nats import NatsPublisher
from schemas import InvalidPayload
from schemas.examples import GenerateReport, SendWelcomeEmail
from tests.conftest import NATS_URL

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "jsonschema"
WELCOME = SendWelcomeEmail(user_id="42", email="ada@example.com", name="Ada")
REPORT = GenerateReport(account_id="acct-1", month="2025-01")


def settings_for(stream: str, prefix: str, **nats_options: object) -> ProducerSettings:
    nats_settings = NatsSettings.model_validate({"servers": [NATS_URL], **nats_options})
    routing = RoutingSettings(subject_prefix=f"{prefix}.", stream=stream)
    return ProducerSettings(transport="nats", source="/tests", nats=nats_settings, routing=routing)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_all(js: JetStreamContext, stream: str, expected: int) -> list[Msg]:
    """Every message of `stream`, through an ephemeral pull consumer."""
    config = ConsumerConfig(ack_policy=AckPolicy.NONE)  # no ack limit stops the reading
    subscription = await js.pull_subscribe("", stream=stream, config=config)
    messages: list[Msg] = []
    try:
        while len(messages) < expected:
            messages += await subscription.fetch(min(expected - len(messages), 1000), timeout=5)
    finally:
        await subscription.unsubscribe()
    assert (await js.stream_info(stream)).state.messages == expected
    return messages


async def eventually(condition: Callable[[], bool], within_s: float) -> None:
    """Wait for `condition` (polled), failing the test after `within_s` seconds."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110  (client state has no event to await)
            await asyncio.sleep(0.01)


async def test_message_has_the_documented_headers_and_a_schema_valid_body(
    new_stream, jetstream
) -> None:
    stream, prefix = await new_stream()
    tracer = TracerProvider().get_tracer("tests")
    async with JobProducer(settings_for(stream, prefix)) as producer:
        with tracer.start_as_current_span("request"):
            receipt = await producer.publish(WELCOME, key="user-42", subject="user/42")
    assert (receipt.transport, receipt.destination, receipt.offset) == ("nats", stream, 1)
    [message] = await read_all(jetstream, stream, 1)
    assert message.subject == f"{prefix}.email.welcome"
    headers = message.headers or {}
    assert set(headers) == {
        "ce-specversion",
        "ce-id",
        "ce-type",
        "ce-source",
        "ce-time",
        "ce-subject",
        "ce-dataschema",
        "Content-Type",
        "traceparent",
        "ce-jobversion",
        "ce-jobattempt",
        "ce-joborigin",
        "ce-partitionkey",
        "Nats-Msg-Id",
    }
    assert headers["Nats-Msg-Id"] == headers["ce-id"] == receipt.job_id
    assert headers["ce-partitionkey"] == "user-42"
    assert headers["ce-type"] == "email.welcome"
    assert headers["ce-joborigin"] == headers["traceparent"]
    schema = json.loads((SCHEMAS / "email.welcome" / "v1.schema.json").read_text())
    assert schema["$id"] == headers["ce-dataschema"]
    jsonschema.validate(json.loads(message.data), schema)


async def test_same_job_id_twice_is_stored_once(new_stream, jetstream) -> None:
    stream, prefix = await new_stream(duplicate_window=60)
    async with JobProducer(settings_for(stream, prefix)) as producer:
        first = await producer.publish(REPORT, id="report-1")
        second = await producer.publish(REPORT, id="report-1")
        [bulk] = await producer.publish_many([PublishRequest(REPORT, id="report-1")])
    assert (first.duplicate, second.duplicate, bulk.duplicate) == (False, True, True)
    assert first.offset == second.offset == bulk.offset
    assert (await jetstream.stream_info(stream)).state.messages == 1


async def test_invalid_payload_is_refused_before_anything_is_sent(new_stream, jetstream) -> None:
    stream, prefix = await new_stream()
    async with JobProducer(settings_for(stream, prefix)) as producer:
        with pytest.raises(InvalidPayload, match="field 'email'"):
            await producer.publish_data(
                "email.welcome", {"user_id": "1", "email": "x", "name": "A"}, 1
            )
    assert (await jetstream.stream_info(stream)).state.messages == 0


async def test_subject_without_a_stream_fails_fast() -> None:
    prefix = f"nostream{uuid.uuid4().hex[:8]}"
    async with JobProducer(settings_for("NONE", prefix)) as producer:
        started = time.monotonic()
        with pytest.raises(DestinationMissing, match="jobstream topics ensure"):
            await producer.publish(REPORT)
        with pytest.raises(DestinationMissing):
            await producer.publish_many([REPORT, REPORT])
        assert time.monotonic() - started < 1


async def test_ensure_creates_then_extends_the_stream(jetstream) -> None:
    name = f"ENSURE_{uuid.uuid4().hex[:8]}"
    prefix = name.lower()
    settings = settings_for(name, prefix)
    routing = settings.routing.model_copy(
        update={"duplicate_window_s": 30.0, "stream_max_age_s": 3600.0}
    )
    publisher = NatsPublisher(settings.nats, routing)
    await publisher.start()
    try:
        assert await publisher.ensure([f"{prefix}.a", f"{prefix}.b"]) == [name]
        info = await jetstream.stream_info(name)
        assert info.config.subjects == [f"{prefix}.>"]
        assert info.config.storage == StorageType.FILE
        assert (info.config.duplicate_window, info.config.max_age) == (30.0, 3600.0)
        assert await publisher.ensure([f"{prefix}.a", f"other{prefix}.x"]) == []
        info = await jetstream.stream_info(name)
        assert info.config.subjects == [f"{prefix}.>", f"other{prefix}.x"]
    finally:
        await publisher.stop()
        await jetstream.delete_stream(name)


async def test_unreachable_server_fails_within_the_connect_timeout() -> None:
    port = closed_port()
    nats_settings = NatsSettings(
        servers=[f"nats://127.0.0.1:{port}"], connect_timeout_s=1.5, reconnect_wait_s=0.2
    )
    producer = JobProducer(ProducerSettings(transport="nats", nats=nats_settings))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}") as caught:
        async with producer:
            await producer.publish(REPORT)
    assert time.monotonic() - started < 1.5 + 1.0
    assert caught.value.retriable


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start (and restart) a nats-server of this test's own, on one port and store."""
    port = closed_port()
    binary = Path(sys.executable).parent / "nats-server"
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        command = [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        return process

    start.port = port  # type: ignore[attr-defined]
    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


async def wait_for_jetstream(url: str) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                client = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            try:
                await client.jetstream().account_info()
                return
            except Exception:
                await asyncio.sleep(0.05)
            finally:
                await client.close()


async def test_publish_while_the_server_is_down_fails_fast_and_is_never_sent_later(
    private_server,
) -> None:
    url = f"nats://127.0.0.1:{private_server.port}"
    server = private_server()
    await wait_for_jetstream(url)
    settings = ProducerSettings(
        transport="nats",
        create_missing=True,
        nats=NatsSettings(
            servers=[url], publish_timeout_s=2, reconnect_wait_s=0.1, max_reconnect_attempts=-1
        ),
        routing=RoutingSettings(stream="PRIVATE", subject_prefix="private."),
    )
    async with JobProducer(settings) as producer:
        assert isinstance(producer.publisher, NatsPublisher)
        client = producer.publisher.client
        await producer.publish(REPORT, id="before")

        server.terminate()
        server.wait(timeout=10)
        await eventually(lambda: not client.is_connected, within_s=5)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1"):
            await producer.publish(REPORT, id="while-down")
        with pytest.raises(BrokerUnavailable):
            await producer.publish_many([REPORT])
        assert time.monotonic() - started < 1

        private_server()  # same port, same store
        await eventually(lambda: client.is_connected, within_s=10)
        await client.flush(timeout=5)  # anything still buffered has reached the server now
        await producer.publish(REPORT, id="after")
        js = client.jetstream()
        assert (await js.stream_info("PRIVATE")).state.messages == 2
        ids = [m.headers["Nats-Msg-Id"] for m in await read_all(js, "PRIVATE", 2) if m.headers]
        assert ids == ["before", "after"]


async def test_bulk_publish_delivers_every_job_exactly_once(new_stream, jetstream) -> None:
    stream, prefix = await new_stream()
    jobs = [GenerateReport(account_id=f"acct-{i}", month="2025-01") for i in range(10_000)]
    async with JobProducer(settings_for(stream, prefix, max_in_flight=500)) as producer:
        receipts = await producer.publish_many(jobs)
    assert [r.offset for r in receipts] == list(range(1, 10_001))
    assert not any(r.duplicate for r in receipts)
    messages = await read_all(jetstream, stream, 10_000)
    ids = [m.headers["Nats-Msg-Id"] for m in messages if m.headers]
    assert len(ids) == len(set(ids)) == 10_000
    assert set(ids) == {r.job_id for r in receipts}


async def test_send_raw_publishes_headers_and_body_as_is(new_stream, jetstream) -> None:
    stream, prefix = await new_stream()
    publisher = NatsPublisher(NatsSettings(servers=[NATS_URL]))
    await publisher.start()
    try:
        receipt = await publisher.send_raw(
            f"{prefix}.dlq", {"Nats-Msg-Id": "j-1", "x-reason": "boom"}, b"\x00raw"
        )
    finally:
        await publisher.stop()
    assert (receipt.job_id, receipt.destination, receipt.offset) == ("j-1", stream, 1)
    [message] = await read_all(jetstream, stream, 1)
    assert (message.data, message.headers) == (
        b"\x00raw",
        {"Nats-Msg-Id": "j-1", "x-reason": "boom"},
    )


async def test_check_names_subjects_no_stream_captures(new_stream) -> None:
    _, prefix = await new_stream()
    publisher = NatsPublisher(NatsSettings(servers=[NATS_URL]))
    await publisher.start()
    try:
        await publisher.check([f"{prefix}.a"])
        with pytest.raises(DestinationMissing, match=r"subjects nowhere\.a, nowhere\.b"):
            await publisher.check([f"{prefix}.a", "nowhere.a", "nowhere.b"])
    finally:
        await publisher.stop()


async def test_sync_producer_from_four_threads_stores_each_job_once(new_stream, jetstream) -> None:
    stream, prefix = await new_stream()
    ids = [[f"sync-{t}-{n}" for n in range(250)] for t in range(4)]

    def publish(thread: int) -> None:
        for job_id in ids[thread]:
            producer.publish(REPORT, key=f"k{thread}", id=job_id)

    producer = SyncJobProducer(settings_for(stream, prefix))
    try:
        await asyncio.to_thread(producer.start)
        threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(lambda: [thread.join(60) for thread in threads])
        again = await asyncio.to_thread(producer.publish, REPORT, id="sync-0-0")
    finally:
        await asyncio.to_thread(producer.stop)
    assert again.duplicate  # JetStream dropped the repeat of the id
    messages = await read_all(jetstream, stream, 1000)
    stored = [m.headers["ce-id"] for m in messages if m.headers]
    assert sorted(stored) == sorted(i for thread in ids for i in thread)
    for t in range(4):
        assert [i for i in stored if i.startswith(f"sync-{t}-")] == ids[t]
