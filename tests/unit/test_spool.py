"""The durable spool (`ProducerSettings.spool`), on the memory broker and its faults:
jobs the broker cannot take are spooled, keep their order and ids, are published exactly
once when it is back, survive a crash, and the bounds and the lock hold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import (
    BrokerUnavailable,
    JobProducer,
    ProducerSettings,
    PublishRequest,
    PublishTimeout,
    Receipt,
    RecordTooLarge,
    SpoolFull,
    SpoolLocked,
    read_spool_status,
)
from producer.memory import MemoryBroker, MemoryPublisher
from producer.retrying import set_testing
from schemas import Job, JobMessage, from_kafka

TOPIC = "jobs.test.spooled"


class Spooled(Job, type="test.spooled", version=1):
    """A job with its ordering key and per-key sequence number in the payload."""

    key: str
    n: int


class DownAtStart(MemoryPublisher):
    """A memory publisher that cannot connect while its broker is disconnected, as a real
    one cannot reach a broker that is down."""

    async def start(self) -> None:
        if not self.broker.faults.connected:
            raise BrokerUnavailable("memory", "the in-memory broker", "fault: down at start")


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    set_testing(True)  # the drainer's waits are skipped
    yield
    set_testing(False)


def settings(path: Path, **spool: object) -> ProducerSettings:
    return ProducerSettings(transport="memory", spool={"path": path, **spool})


def producer_on(broker: MemoryBroker, path: Path, **spool: object) -> JobProducer:
    return JobProducer(settings(path, **spool), publisher=DownAtStart(broker, partitions=3))


def published(broker: MemoryBroker) -> list[tuple[str, int, str]]:
    """(key, n, job id) of every record in the topic, per partition in offset order."""
    found = []
    for partition in range(broker.partitions(TOPIC)):
        for record in broker.read(TOPIC, partition, 0, max_records=100_000):
            attributes = from_kafka(record.key, record.headers)
            job = Spooled.model_validate_json(record.value)
            found.append((job.key, job.n, attributes.id))
    return found


def requests(count: int, keys: int) -> list[PublishRequest]:
    return [
        PublishRequest(Spooled(key=f"k{i % keys}", n=i // keys), key=f"k{i % keys}")
        for i in range(count)
    ]


def assert_in_key_order(found: list[tuple[str, int, str]]) -> None:
    per_key: dict[str, list[int]] = {}
    for key, n, _ in found:
        per_key.setdefault(key, []).append(n)
    for key, numbers in per_key.items():
        assert numbers == sorted(numbers), key


async def test_jobs_are_spooled_while_the_broker_is_down_and_drained_in_order_once(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 3)
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        first = await producer.publish(Spooled(key="k0", n=0), key="k0")
        assert not first.spooled
        broker.faults.disconnect()
        receipts = [await producer.publish(r.job, key=r.key) for r in requests(40, 4)[4:]]
        assert all(r.spooled and r.partition is None and r.offset == -1 for r in receipts)
        status = await producer.spool_status()
        assert status.jobs == 36
        assert status.destinations == {TOPIC: 36}
        broker.faults.reconnect()
        await broker.wait_until(lambda: len(published(broker)) == 37, max_wait_s=5)
        await asyncio.sleep(0.05)  # nothing more arrives
        assert (await producer.spool_status()).jobs == 0
    found = published(broker)
    assert sorted(job_id for *_, job_id in found) == sorted(
        [first.job_id, *(r.job_id for r in receipts)]
    )  # every id exactly once
    assert_in_key_order(found)


async def test_new_jobs_queue_behind_the_spool_and_never_overtake(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.fail_appends(1)  # one failure: the first job is spooled
        spooled = await producer.publish(Spooled(key="a", n=0), key="a")
        assert spooled.spooled
        # The broker is back, but the next job of the key must wait behind the first.
        later = await producer.publish(Spooled(key="a", n=1), key="a")
        await broker.wait_until(lambda: len(published(broker)) == 2, max_wait_s=5)
    assert [(n, job_id) for _, n, job_id in published(broker)] == [
        (0, spooled.job_id),
        (1, later.job_id),
    ]


async def test_a_publish_timeout_is_spooled_and_published_under_the_same_id(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.fail_appends(3, PublishTimeout("memory", TOPIC, 1.0))
        receipt = await producer.publish(Spooled(key="a", n=0), key="a", id="job-7")
        assert receipt.spooled
        assert receipt.job_id == "job-7"
        await broker.wait_until(lambda: len(published(broker)) == 1, max_wait_s=5)
    [(_, _, job_id)] = published(broker)
    assert job_id == "job-7"


async def test_spooled_jobs_keep_every_attribute_and_the_body(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.disconnect()
        from opentelemetry import context, propagate

        carrier = {"traceparent": traceparent}
        token = context.attach(propagate.extract(carrier))
        try:
            await producer.publish(Spooled(key="a", n=3), key="a", subject="user/1")
        finally:
            context.detach(token)
        spool = producer._spooling
        assert spool is not None
        [stored] = await spool.spool.head(TOPIC, 10)
        broker.faults.reconnect()
        await broker.wait_until(lambda: len(published(broker)) == 1, max_wait_s=5)
    [record] = broker.read(TOPIC, 0, 0)
    assert from_kafka(record.key, record.headers) == stored.message.attributes
    assert record.value == stored.message.body
    assert stored.message.attributes.traceparent == traceparent
    assert stored.message.attributes.subject == "user/1"


async def test_start_succeeds_while_the_broker_is_down_and_the_drainer_connects(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 3)
    broker.faults.disconnect()
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        receipts = await producer.publish_many(requests(30, 3))
        assert all(r.spooled for r in receipts)
        broker.faults.reconnect()
        await broker.wait_until(lambda: len(published(broker)) == 30, max_wait_s=5)
    found = published(broker)
    assert sorted(j for *_, j in found) == sorted(r.job_id for r in receipts)
    assert_in_key_order(found)


async def test_a_new_producer_publishes_what_a_crashed_one_left(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 3)
    path = tmp_path / "spool.db"
    broker.faults.disconnect()
    crashed = producer_on(broker, path, stop_drain_s=0)
    await crashed.start()
    receipts = await crashed.publish_many(requests(25, 5))
    # A crash: the process dies without stop(); its lock goes with it.
    spooling = crashed._spooling
    assert spooling is not None
    drainer = spooling._drainer
    assert drainer is not None
    drainer.cancel()
    await spooling.spool.close()
    assert read_spool_status(path).jobs == 25
    broker.faults.reconnect()
    async with producer_on(broker, path) as producer:
        await broker.wait_until(lambda: len(published(broker)) == 25, max_wait_s=5)
        assert (await producer.spool_status()).jobs == 0
    found = published(broker)
    assert sorted(j for *_, j in found) == sorted(r.job_id for r in receipts)
    assert_in_key_order(found)


async def test_stop_leaves_what_it_cannot_publish_on_disk(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    path = tmp_path / "spool.db"
    broker.faults.disconnect()
    async with producer_on(broker, path, stop_drain_s=0.2) as producer:
        await producer.publish_many(requests(10, 2))
    status = read_spool_status(path)
    assert (status.jobs, status.destinations) == (10, {TOPIC: 10})
    assert status.oldest_age_s is not None
    assert status.bytes > 0
    assert published(broker) == []


async def test_flush_publishes_now_or_raises_while_the_broker_is_down(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    broker.faults.disconnect()
    async with producer_on(broker, tmp_path / "spool.db", stop_drain_s=0) as producer:
        await producer.publish_many(requests(7, 1))
        with pytest.raises(BrokerUnavailable):
            await producer.flush_spool()
        broker.faults.reconnect()
        drained = await producer.flush_spool()
        assert (await producer.spool_status()).jobs == 0
    assert drained + 0 <= 7
    assert [n for _, n, _ in published(broker)] == list(range(7))


async def test_a_second_process_takes_the_next_slot_and_one_past_the_bound_is_refused(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    path = tmp_path / "spool.db"
    async with (
        producer_on(broker, path, max_processes=2) as first,
        producer_on(broker, path, max_processes=2) as second,
    ):
        assert first._spooling is not None and second._spooling is not None
        assert first._spooling.spool.path == path
        assert second._spooling.spool.path == tmp_path / "spool.db.1"
        third = producer_on(broker, path, max_processes=2)
        with pytest.raises(SpoolLocked, match="JOBSTREAM_SPOOL__MAX_PROCESSES") as caught:
            await third.start()
        assert str(path) in str(caught.value)
    async with producer_on(broker, path, max_processes=1) as again:  # released on stop
        assert again._spooling is not None
        assert again._spooling.spool.path == path


async def test_a_full_spool_refuses_the_job_and_names_the_cause(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    broker.faults.disconnect()
    async with producer_on(broker, tmp_path / "spool.db", max_jobs=3, stop_drain_s=0) as p:
        for n in range(3):
            assert (await p.publish(Spooled(key="a", n=n), key="a")).spooled
        with pytest.raises(SpoolFull, match="3 of 3 jobs") as caught:
            await p.publish(Spooled(key="a", n=3), key="a", id="over")
        assert caught.value.job_id == "over"
        assert caught.value.retriable
        with pytest.raises(SpoolFull):
            await p.publish_many(requests(1, 1))
        assert (await p.spool_status()).jobs == 3


async def test_the_byte_bound_holds(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    broker.faults.disconnect()
    async with producer_on(broker, tmp_path / "spool.db", max_bytes=2048, stop_drain_s=0) as p:
        with pytest.raises(SpoolFull, match="bytes"):
            await p.publish_many(requests(100, 1))
        assert (await p.spool_status()).jobs == 0  # a batch is spooled whole or not at all
        assert (await p.publish(Spooled(key="a", n=0), key="a")).spooled
        assert 0 < (await p.spool_status()).bytes <= 2048


async def test_permanent_errors_are_not_spooled(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.limit_record_bytes(10)
        with pytest.raises(RecordTooLarge) as caught:
            await producer.publish(Spooled(key="a", n=0), key="a", id="big")
        assert caught.value.job_id == "big"
        assert (await producer.spool_status()).jobs == 0


async def test_without_a_spool_the_error_raises_and_carries_the_job_id() -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    settings = ProducerSettings(transport="memory")
    async with JobProducer(settings, publisher=MemoryPublisher(broker)) as producer:
        broker.faults.fail_appends(1, PublishTimeout("memory", TOPIC, 1.0))
        with pytest.raises(PublishTimeout) as caught:
            await producer.publish(Spooled(key="a", n=0), id="ambiguous")
        assert caught.value.job_id == "ambiguous"
        with pytest.raises(RuntimeError, match="no spool"):
            await producer.spool_status()


async def test_a_job_refused_for_good_while_draining_is_set_aside(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.disconnect()
        small = await producer.publish(Spooled(key="a", n=0), key="a")
        await producer.publish(Spooled(key="a" * 3000, n=1), key="b")  # too large
        after = await producer.publish(Spooled(key="a", n=2), key="a")
        broker.faults.reset()
        broker.faults.limit_record_bytes(2000)
        async with asyncio.timeout(5):
            while (status := await producer.spool_status()).jobs:  # noqa: ASYNC110 - a poll of a file
                await asyncio.sleep(0.01)
        assert status.refused == 1
    # The batch failed at the large job: it is sent again one by one, so the job before
    # it may be stored twice (the same id: a repeat the workers skip).
    ids = list(dict.fromkeys(job_id for *_, job_id in published(broker)))
    assert ids == [small.job_id, after.job_id]


async def test_spooling_and_draining_are_logged_with_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    caplog.set_level(logging.INFO, "jobstream.producer")
    async with producer_on(broker, tmp_path / "spool.db") as producer:
        broker.faults.disconnect()
        await producer.publish_many(requests(5, 1))
        broker.faults.reconnect()
        await broker.wait_until(lambda: len(published(broker)) == 5, max_wait_s=5)
        await asyncio.sleep(0.01)
    text = caplog.text
    assert "spool: spooling jobs to" in text
    assert "spool: published 5 spooled jobs (0 left)" in text
    assert "5 jobs spooled and 5 published from it" in text


class RefusedAtStart(MemoryPublisher):
    async def start(self) -> None:
        msg = "SASL without credentials"
        raise ValueError(msg)


async def test_a_start_that_fails_for_good_leaves_the_spool_unlocked(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    refused = JobProducer(settings(path), publisher=RefusedAtStart(MemoryBroker()))
    with pytest.raises(ValueError, match="SASL"):
        await refused.start()
    async with producer_on(MemoryBroker(), path):  # the lock was released
        pass


class GivesUp(DownAtStart):
    """A client that gives its connection up for good when the broker goes away (nats-py
    after its reconnect attempts): only a new one (stop, start) reaches the broker again."""

    broken = False
    restarts = 0

    async def start(self) -> None:
        await super().start()
        if self.broken:
            self.restarts += 1
        self.broken = False

    async def send(self, destination: str, message: JobMessage) -> Receipt:
        # (`send_many` sends one by one through this.)
        if self.broken or not self.broker.faults.connected:
            self.broken = True
            raise BrokerUnavailable("memory", "the in-memory broker", "connection closed")
        return await super().send(destination, message)


async def test_the_drainer_replaces_a_client_that_gave_up(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    publisher = GivesUp(broker)
    producer = JobProducer(settings(tmp_path / "spool.db"), publisher=publisher)
    async with producer:
        broker.faults.disconnect()
        receipts = await producer.publish_many(requests(10, 2))
        assert all(r.spooled for r in receipts)
        broker.faults.reconnect()  # back, but this client stays broken
        await broker.wait_until(lambda: len(published(broker)) == 10, max_wait_s=5)
    assert publisher.restarts >= 1
    assert sorted(j for *_, j in published(broker)) == sorted(r.job_id for r in receipts)
