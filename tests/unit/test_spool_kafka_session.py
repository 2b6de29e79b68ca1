"""After an outage the broker may refuse the Kafka client's idempotent session
(`OutOfOrderSequenceNumber` once batches expired): the publish fails as retriable
`BrokerBusy`, so the spool keeps the job, and the next publish runs on a new client.
Found by tests/integration/test_spool_outage.py: without it every later publish failed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

from producer import BrokerBusy, KafkaSettings
from producer.kafka import KafkaPublisher
from schemas import encode
from schemas.examples import GenerateReport

TOPIC = "jobs.report.generate"


class FakeClient:
    """Stands in for an `AIOKafkaProducer`: each send fails with `failure`, or succeeds."""

    def __init__(self, failure: Exception | None) -> None:
        self.failure = failure
        self.started = self.stopped = False
        self.sent = 0

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[Any]:
        self.sent += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            future.set_exception(self.failure)
        else:
            future.set_result(SimpleNamespace(topic=topic, partition=0, offset=41))
        return future


async def test_a_refused_session_is_retriable_and_the_next_send_uses_a_new_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clients = [FakeClient(OutOfOrderSequenceNumber()), FakeClient(None)]
    publisher = KafkaPublisher(KafkaSettings())
    made: list[FakeClient] = []

    def new_producer() -> Any:
        client = clients[len(made)]
        made.append(client)
        return client

    monkeypatch.setattr(publisher, "_new_producer", new_producer)
    await publisher.start()
    publisher._known_topics.add(TOPIC)  # no metadata round trip in this test
    message = encode(GenerateReport(account_id="a", month="2025-01"), source="/tests")
    with pytest.raises(BrokerBusy, match="OutOfOrderSequenceNumber"):
        await publisher.send(TOPIC, message)
    receipt = await publisher.send(TOPIC, message)
    assert (receipt.job_id, receipt.offset) == (message.attributes.id, 41)
    assert made == clients
    assert clients[0].stopped and clients[1].started
    await publisher.stop()
