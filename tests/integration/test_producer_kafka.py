"""`JobProducer` on the real Kafka broker, read back with a plain aiokafka consumer."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.client import AIOKafkaClient
from opentelemetry.sdk.trace import TracerProvider

from producer import (
    BrokerUnavailable,
    DestinationMissing,
    JobProducer,
    KafkaSettings,
    ProducerSettings,
    PublishRequest,
    RoutingSettings,
    SyncJobProducer,
)
from producer.kafka import KafkaPublisher
from schemas import InvalidPayload
from schemas.examples import GenerateReport, SendWelcomeEmail
from tests.conftest import KAFKA_BOOTSTRAP

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "jsonschema"
WELCOME = SendWelcomeEmail(user_id="42", email="ada@example.com", name="Ada")


def settings_for(topic: str, **overrides: object) -> ProducerSettings:
    routing = RoutingSettings(routes={"email.welcome": topic, "report.generate": topic})
    return ProducerSettings.model_validate(
        {"transport": "kafka", "source": "/tests", "routing": routing, **overrides}
    )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_all(topic: str, partitions: int, expected: int) -> list[ConsumerRecord]:
    """Every record of `topic`: exactly `expected` are there, and all are returned."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KAFKA_BOOTSTRAP, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        assert sum(ends.values()) == expected
        records: list[ConsumerRecord] = []
        while len(records) < expected:
            batch = await consumer.getmany(timeout_ms=2000)
            records += [r for rs in batch.values() for r in rs]
        return records
    finally:
        await consumer.stop()


async def test_record_has_the_documented_headers_and_a_schema_valid_body(new_topic) -> None:
    topic = await new_topic(partitions=3)
    tracer = TracerProvider().get_tracer("tests")
    async with JobProducer(settings_for(topic)) as producer:
        with tracer.start_as_current_span("request"):
            receipt = await producer.publish(WELCOME, key="user-42", subject="user/42")
    [record] = await read_all(topic, 3, 1)
    assert (record.partition, record.offset) == (receipt.partition, receipt.offset)
    assert record.key == b"user-42"
    headers = dict(record.headers)
    assert [name for name, _ in record.headers] == [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "ce_subject",
        "ce_dataschema",
        "content-type",
        "traceparent",
        "ce_jobversion",
        "ce_jobattempt",
        "ce_joborigin",
    ]
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"].decode() == receipt.job_id
    assert headers["ce_type"] == b"email.welcome"
    assert headers["ce_source"] == b"/tests"
    assert headers["ce_dataschema"] == b"urn:jobstream:schema:email.welcome:v1"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_joborigin"] == headers["traceparent"]
    schema = json.loads((SCHEMAS / "email.welcome" / "v1.schema.json").read_text())
    assert schema["$id"] == headers["ce_dataschema"].decode()
    jsonschema.validate(json.loads(record.value), schema)


async def test_invalid_payload_is_refused_before_anything_is_sent(new_topic) -> None:
    topic = await new_topic()
    async with JobProducer(settings_for(topic)) as producer:
        with pytest.raises(InvalidPayload, match="field 'month'"):
            await producer.publish_data("report.generate", {"account_id": "a", "month": "2025-13"})
    await read_all(topic, 1, 0)


async def test_missing_topic_fails_fast_and_is_not_created(kafka_admin) -> None:
    topic = f"missing-{time.time_ns()}"
    async with JobProducer(settings_for(topic)) as producer:
        started = time.monotonic()
        with pytest.raises(DestinationMissing, match="jobstream topics ensure"):
            await producer.publish(WELCOME)
        assert time.monotonic() - started < 2
    assert topic not in await kafka_admin.list_topics()


async def test_create_missing_creates_the_topic_once(kafka_admin) -> None:
    topic = f"created-{time.time_ns()}"
    try:
        settings = settings_for(
            topic,
            create_missing=True,
            routing=RoutingSettings(routes={"email.welcome": topic}, partitions=2),
        )
        async with JobProducer(settings) as producer:
            bulk = await producer.publish_many([WELCOME, WELCOME])  # right after creating it
            first = await producer.publish(WELCOME)
            second = await producer.publish(WELCOME)
        assert {first.destination, second.destination, *(r.destination for r in bulk)} == {topic}
        [described] = await kafka_admin.describe_topics([topic])
        assert len(described["partitions"]) == 2
    finally:
        await kafka_admin.delete_topics([topic])


async def test_concurrent_first_publishes_share_one_metadata_fetch(
    new_topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: each publish that started before the topic was known fetched the whole
    cluster's metadata itself (16 to 22 fetches at 1,000 publishes/s, a 130 to 190 ms
    stall); concurrent first publishes now share one check, found or missing."""
    fetches = 0
    fetch_all = AIOKafkaClient.fetch_all_metadata

    async def counted(self: AIOKafkaClient) -> object:
        nonlocal fetches
        fetches += 1
        return await fetch_all(self)

    monkeypatch.setattr(AIOKafkaClient, "fetch_all_metadata", counted)
    topic = await new_topic(partitions=2)
    missing = f"missing-{time.time_ns()}"
    async with JobProducer(settings_for(topic)) as producer:
        receipts = await asyncio.gather(*(producer.publish(WELCOME) for _ in range(200)))
        assert fetches == 1
        assert len({r.job_id for r in receipts}) == 200
        missing_settings = settings_for(missing)
    async with JobProducer(missing_settings) as producer:
        refused = await asyncio.gather(
            *(producer.publish(WELCOME) for _ in range(50)), return_exceptions=True
        )
    assert all(isinstance(error, DestinationMissing) for error in refused)
    assert fetches == 2
    await read_all(topic, 2, 200)


async def test_unreachable_broker_fails_within_the_connect_timeout() -> None:
    port = closed_port()
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", connect_timeout_s=1.5)
    producer = JobProducer(settings_for("t", kafka=kafka))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}") as caught:
        async with producer:
            await producer.publish(WELCOME)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.5 + 1.0, elapsed  # it retried, and it gave up in time
    assert caught.value.retriable
    assert "make up" in str(caught.value)


async def test_bulk_publish_delivers_every_job_exactly_once(new_topic) -> None:
    topic = await new_topic(partitions=4)
    jobs = [GenerateReport(account_id=f"acct-{i}", month="2025-01") for i in range(10_000)]
    async with JobProducer(settings_for(topic)) as producer:
        receipts = await producer.publish_many(jobs)
    assert len(receipts) == 10_000
    records = await read_all(topic, 4, 10_000)
    ids = [dict(r.headers)["ce_id"].decode() for r in records]
    assert sorted(ids) == sorted(r.job_id for r in receipts)
    assert len(set(ids)) == 10_000
    offsets = {(r.partition, r.offset) for r in receipts}
    assert offsets == {(r.partition, r.offset) for r in records}


async def test_send_record_publishes_raw_bytes(new_topic) -> None:
    topic = await new_topic()
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    await publisher.start()
    try:
        receipt = await publisher.send_record(
            topic, None, [("ce_id", b"j-1"), ("x", b"\xff")], b"?"
        )
    finally:
        await publisher.stop()
    [record] = await read_all(topic, 1, 1)
    assert (receipt.job_id, receipt.offset) == ("j-1", 0)
    expected = (None, b"?", (("ce_id", b"j-1"), ("x", b"\xff")))
    assert (record.key, record.value, record.headers) == expected


async def test_a_key_lands_in_one_partition_via_publish_and_publish_many(new_topic) -> None:
    topic = await new_topic(partitions=6)
    keys = [f"user-{i}" for i in range(12)]
    async with JobProducer(settings_for(topic)) as producer:
        single = [await producer.publish(WELCOME, key=k) for k in keys]
        bulk = await producer.publish_many([PublishRequest(WELCOME, key=k) for k in keys])
    assert [r.partition for r in single] == [r.partition for r in bulk]
    assert len({r.partition for r in single}) > 1
    # Within a partition, publish order is offset order.
    for first, second in zip(single, bulk, strict=True):
        assert second.offset > first.offset


async def test_check_names_missing_topics_without_creating_them(new_topic, kafka_admin) -> None:
    topic = await new_topic()
    missing = f"missing-{time.time_ns()}"
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=KAFKA_BOOTSTRAP))
    await publisher.start()
    try:
        await publisher.check([topic])
        with pytest.raises(DestinationMissing, match=f"topic '{missing}' does not exist"):
            await publisher.check([topic, missing])
    finally:
        await publisher.stop()
    assert missing not in await kafka_admin.list_topics()


async def test_sync_producer_from_four_threads_stores_each_job_once(new_topic) -> None:
    topic = await new_topic(partitions=3)
    ids = [[f"sync-{t}-{n}" for n in range(250)] for t in range(4)]
    report = GenerateReport(account_id="acct-1", month="2025-01")

    def publish(thread: int) -> None:
        for n, job_id in enumerate(ids[thread]):
            producer.publish(report, key=f"k{thread}", id=job_id, subject=str(n))

    producer = SyncJobProducer(settings_for(topic))
    try:
        await asyncio.to_thread(producer.start)
        threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        await asyncio.to_thread(lambda: [thread.join(60) for thread in threads])
    finally:
        await asyncio.to_thread(producer.stop)
    records = await read_all(topic, 3, 1000)
    stored = [dict(r.headers)["ce_id"].decode() for r in records]
    assert sorted(stored) == sorted(i for thread in ids for i in thread)
    for t in range(4):  # each key's jobs in publish order (one partition per key)
        assert [i for i in stored if i.startswith(f"sync-{t}-")] == ids[t]
