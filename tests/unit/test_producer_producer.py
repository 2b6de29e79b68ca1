"""`JobProducer` on the in-memory broker: routing, receipts, validation, provisioning."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from producer import (
    DestinationMissing,
    JobProducer,
    ProducerSettings,
    PublishRequest,
    Receipt,
    RoutingSettings,
)
from producer._settings import Transport
from producer.memory import BROKER, MemoryBroker, MemoryPublisher
from schemas import InvalidPayload, JobMessage, UnknownJobType, from_kafka
from schemas.examples import GenerateReport, ResizeImage, SendWelcomeEmail

WELCOME = SendWelcomeEmail(user_id="42", email="ada@example.com", name="Ada")
REPORT = GenerateReport(account_id="acct-1", month="2025-01")


def settings(**overrides: object) -> ProducerSettings:
    return ProducerSettings.model_validate({"transport": "memory", **overrides})


async def provisioned(
    broker: MemoryBroker | None = None, **overrides: object
) -> tuple[JobProducer, MemoryBroker]:
    broker = broker if broker is not None else MemoryBroker()
    producer = JobProducer(settings(**overrides), publisher=MemoryPublisher(broker, partitions=3))
    await producer.start()
    await producer.ensure(["email.welcome", "report.generate", "image.resize"])
    return producer, broker


async def test_publish_routes_by_type_and_returns_the_receipt() -> None:
    producer, broker = await provisioned()
    receipt = await producer.publish(WELCOME, key="user-42", id="job-1", subject="user/42")
    assert receipt == Receipt("job-1", "memory", "jobs.email.welcome", receipt.partition, 0)
    [record] = broker.read("jobs.email.welcome", receipt.partition or 0, 0)
    attributes = from_kafka(record.key, record.headers)
    assert (attributes.id, attributes.type, attributes.key) == ("job-1", "email.welcome", "user-42")
    assert attributes.subject == "user/42"
    assert attributes.source == "/jobstream"
    assert record.key == b"user-42"
    assert SendWelcomeEmail.model_validate_json(record.value) == WELCOME


async def test_routes_override_the_prefix() -> None:
    routing = RoutingSettings(topic_prefix="svc.", routes={"report.generate": "reports"})
    producer, broker = await provisioned(routing=routing)
    assert producer.destination("report.generate") == "reports"
    assert producer.destination("email.welcome") == "svc.email.welcome"
    assert (await producer.publish(REPORT)).destination == "reports"
    assert broker.topics() == ["reports", "svc.email.welcome", "svc.image.resize"]


def test_nats_routing_uses_subjects() -> None:
    class NatsLike(MemoryPublisher):
        @property
        def transport(self) -> Transport:
            return "nats"

    routing = RoutingSettings(topic_prefix="t.", subject_prefix="s.")
    producer = JobProducer(settings(routing=routing), publisher=NatsLike())
    assert producer.destination("email.welcome") == "s.email.welcome"


async def test_publish_many_keeps_input_order_across_types_and_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("producer._producer.MAX_BATCH", 4)
    producer, broker = await provisioned()
    requests: list[SendWelcomeEmail | GenerateReport | PublishRequest] = []
    for i in range(5):
        requests += [WELCOME, PublishRequest(REPORT, key=f"k{i}", id=f"report-{i}")]
    receipts = await producer.publish_many(requests)
    assert [r.destination for r in receipts] == ["jobs.email.welcome", "jobs.report.generate"] * 5
    assert [r.job_id for r in receipts[1::2]] == [f"report-{i}" for i in range(5)]
    assert len({r.job_id for r in receipts}) == 10
    stored = sum(broker.end_offset("jobs.report.generate", p) for p in range(3))
    assert stored == 5
    assert await producer.publish_many([]) == []


async def test_publish_options_travel_as_attributes() -> None:
    producer, broker = await provisioned(source="/services/signup")
    later = datetime(2030, 1, 1, tzinfo=UTC)
    receipt = await producer.publish(
        WELCOME, idempotency_key="welcome-42", not_before=later, id="j"
    )
    record = broker.read(receipt.destination, receipt.partition or 0, receipt.offset)[0]
    attributes = from_kafka(record.key, record.headers)
    assert attributes.idempotency_key == "welcome-42"
    assert attributes.not_before == later
    assert attributes.source == "/services/signup"
    assert attributes.key is None
    assert attributes.dataschema == "urn:jobstream:schema:email.welcome:v1"


async def test_publish_data_validates_before_anything_is_sent() -> None:
    producer, broker = await provisioned()
    bad = {"user_id": "42", "email": "not-an-address", "name": "Ada"}
    with pytest.raises(InvalidPayload, match="field 'email'"):
        await producer.publish_data("email.welcome", bad)
    with pytest.raises(UnknownJobType):
        await producer.publish_data("no.such.type", {})
    assert all(broker.end_offset("jobs.email.welcome", p) == 0 for p in range(3))

    good = {"user_id": "42", "email": "ada@example.com", "name": "Ada"}
    receipt = await producer.publish_data("email.welcome", good, version=1, key="user-42")
    record = broker.read(receipt.destination, receipt.partition or 0, 0)[0]
    assert from_kafka(record.key, record.headers).version == 1
    # Without a version, the latest model (v2) is used, and its required field is enforced.
    with pytest.raises(InvalidPayload, match="marketing_opt_in"):
        await producer.publish_data("email.welcome", good)


async def test_missing_destination_is_never_created_silently() -> None:
    producer = JobProducer(settings(), publisher=MemoryPublisher())
    async with producer:
        with pytest.raises(DestinationMissing, match="jobstream topics ensure"):
            await producer.publish(WELCOME)
        with pytest.raises(DestinationMissing):
            await producer.publish_many([REPORT])


async def test_create_missing_ensures_each_destination_once() -> None:
    calls: list[list[str]] = []

    class Counting(MemoryPublisher):
        async def ensure(self, destinations: Sequence[str]) -> list[str]:
            calls.append(list(destinations))
            return await super().ensure(destinations)

    async with JobProducer(settings(create_missing=True), publisher=Counting()) as producer:
        await producer.publish(WELCOME)
        await producer.publish(WELCOME)
        url = "https://example.com/a.png"
        image = ResizeImage(upload_id="u", source_url=url, width=10, height=10)
        await producer.publish_many([WELCOME, REPORT, image])
    assert calls == [["jobs.email.welcome"], ["jobs.report.generate", "jobs.image.resize"]]


async def test_publishing_before_start_says_how_to_start() -> None:
    producer = JobProducer(settings(), publisher=MemoryPublisher())
    with pytest.raises(RuntimeError, match="async with JobProducer"):
        await producer.publish(WELCOME)
    async with producer:
        pass
    with pytest.raises(RuntimeError, match="not started"):
        await producer.publish_many([WELCOME])


async def test_transport_memory_publishes_to_the_process_broker() -> None:
    async with JobProducer(settings(create_missing=True)) as producer:
        receipt = await producer.publish(REPORT)
    assert receipt.transport == "memory"
    assert isinstance(producer.publisher, MemoryPublisher)
    assert producer.publisher.broker is BROKER  # the one consumer.memory.BACKEND reads
    record = BROKER.read("jobs.report.generate", receipt.partition or 0, receipt.offset, 1)[0]
    assert dict(record.headers)["ce_id"].decode() == receipt.job_id


async def test_a_custom_publisher_only_needs_the_protocol() -> None:
    sent: list[tuple[str, JobMessage]] = []

    class Recording:
        transport: Transport = "kafka"

        async def start(self) -> None: ...
        async def stop(self) -> None: ...

        async def send(self, destination: str, message: JobMessage) -> Receipt:
            sent.append((destination, message))
            return Receipt(message.attributes.id, "kafka", destination, 0, len(sent) - 1)

        async def send_many(self, items: Sequence[tuple[str, JobMessage]]) -> list[Receipt]:
            return [await self.send(d, m) for d, m in items]

        async def ensure(self, destinations: Sequence[str]) -> list[str]:
            return []

    async with JobProducer(settings(), publisher=Recording()) as producer:
        await producer.publish(REPORT, id="r1")
    assert [(d, m.attributes.id) for d, m in sent] == [("jobs.report.generate", "r1")]


async def test_delay_is_a_shorthand_for_not_before() -> None:
    producer, broker = await provisioned()
    before = datetime.now(UTC)
    receipt = await producer.publish(REPORT, delay=timedelta(seconds=90))
    many = await producer.publish_many([PublishRequest(REPORT, delay=30.0)])
    after = datetime.now(UTC)
    records = [
        r
        for p in range(3)
        for r in broker.read("jobs.report.generate", p, 0)
        if r.offset in {receipt.offset, many[0].offset}
    ]
    due = {
        from_kafka(r.key, r.headers).id: from_kafka(r.key, r.headers).not_before for r in records
    }
    first, second = due[receipt.job_id], due[many[0].job_id]
    assert first is not None and second is not None
    assert before + timedelta(seconds=90) <= first <= after + timedelta(seconds=90)
    assert before + timedelta(seconds=30) <= second <= after + timedelta(seconds=30)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delay must be"):
            await producer.publish(REPORT, delay=bad)
    with pytest.raises(ValueError, match="not both"):
        await producer.publish(REPORT, delay=1, not_before=after)
    await producer.stop()
