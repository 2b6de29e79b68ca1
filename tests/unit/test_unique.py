"""Unique jobs on the memory broker and the memory store: the state machine of a unique key
(window, expiry, release on a definite failure, the job id kept on a timeout, takeover
after the lease, waiting for a reserved key), counted on the broker by job id."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from producer import (
    BrokerUnavailable,
    JobProducer,
    MemoryUniqueStore,
    ProducerSettings,
    PublishError,
    PublishRequest,
    PublishTimeout,
    Receipt,
    SyncJobProducer,
    UniqueKeyBusy,
    UniqueSettings,
    UniqueStoreUnavailable,
)
from producer._unique import Stored, UniqueRecord, claim_record, settle_record
from producer._unique_keys import Reservation, UniqueKeys, _redacted
from producer.memory import MemoryBroker, MemoryPublisher
from schemas.examples import GenerateReport

TOPIC = "jobs.report.generate"
JOB = GenerateReport(account_id="a", month="2025-01")


class Clock:
    """A wall clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def job_ids(broker: MemoryBroker) -> list[str]:
    """The job id of every record on the topic, in order (repeats included)."""
    return [dict(r.headers)["ce_id"].decode() for r in broker.read(TOPIC, 0, 0, 100_000)]


@pytest.fixture
def broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_topic(TOPIC, 1)
    return broker


@pytest.fixture
def store() -> MemoryUniqueStore:
    return MemoryUniqueStore()


def settings(**unique: object) -> ProducerSettings:
    return ProducerSettings(transport="memory", unique={"url": "memory", **unique})


@pytest.fixture
async def producer(broker: MemoryBroker, store: MemoryUniqueStore) -> AsyncIterator[JobProducer]:
    async with JobProducer(
        settings(), publisher=MemoryPublisher(broker), unique_store=store
    ) as producer:
        yield producer


async def record(store: MemoryUniqueStore, key: str) -> UniqueRecord | None:
    stored = await store.get(key)
    return None if stored is None else UniqueRecord.loads(stored.value)


# The state machine, as pure functions.


def test_a_claim_reserves_an_absent_or_expired_key_and_waits_for_a_live_one() -> None:
    new = claim_record(None, "j1", "h1", 100.0, lease_s=10, window_s=60)
    assert new.outcome == "reserved"
    assert new.record == UniqueRecord("j1", "h1", 110.0, 160.0)
    assert claim_record(new.record, "j2", "h2", 105.0, 10, 60) == ("busy", new.record)
    receipt = Receipt("j1", "memory", TOPIC, 0, 7)
    published = dataclasses.replace(new.record, receipt=receipt)
    assert claim_record(published, "j2", "h2", 159.0, 10, 60) == ("published", published)
    # Window over: a new job, a new window.
    again = claim_record(published, "j3", "h3", 160.0, 10, 60)
    assert again.record == UniqueRecord("j3", "h3", 170.0, 220.0)


def test_a_reservation_past_its_lease_is_taken_over_with_its_job_id_and_window() -> None:
    held = UniqueRecord("j1", "h1", lease_until=110.0, window_until=160.0)
    taken = claim_record(held, "j2", "h2", 110.0, lease_s=10, window_s=999)
    assert taken == ("reserved", UniqueRecord("j1", "h2", 120.0, 160.0))
    # Past both its lease and its window, nobody holds it: a new job.
    assert claim_record(held, "j2", "h2", 161.0, 10, 60).record.job_id == "j2"


def test_settling_follows_the_holder_and_the_job_id() -> None:
    held = UniqueRecord("j1", "h1", 110.0, 160.0)
    receipt = Receipt("j1", "memory", TOPIC, 0, 7)
    # Any holder of the job id may settle published (the record is stored under it).
    assert settle_record(held, "j1", "old", "published", 105.0, receipt) == (
        dataclasses.replace(held, receipt=receipt)
    )
    assert settle_record(held, "other-job", "h1", "published", 105.0, receipt) is None
    # Only the holder releases or ends its lease: a taken-over publish undoes nothing.
    assert settle_record(held, "j1", "h1", "released", 105.0) == "delete"
    assert settle_record(held, "j1", "old", "released", 105.0) is None
    ended = settle_record(held, "j1", "h1", "lease-ended", 105.0)
    assert ended == dataclasses.replace(held, lease_until=105.0)
    published = dataclasses.replace(held, receipt=receipt)
    assert settle_record(published, "j1", "h1", "released", 105.0) is None  # final
    assert settle_record(None, "j1", "h1", "published", 105.0, receipt) is None


def test_a_record_round_trips_through_its_text() -> None:
    receipt = Receipt("j1", "nats", "JOBS", None, 9, spooled=True)
    for rec in (UniqueRecord("j1", "h", 1.5, 2.5), UniqueRecord("j1", "h", 1.5, 2.5, receipt)):
        assert UniqueRecord.loads(rec.dumps()) == rec


# Through JobProducer.


async def test_100_concurrent_publishes_of_one_key_store_one_job(
    producer: JobProducer, broker: MemoryBroker
) -> None:
    receipts = await asyncio.gather(
        *(producer.publish(JOB, unique_key="report-a", unique_for=60) for _ in range(100))
    )
    assert len(job_ids(broker)) == 1
    assert {r.job_id for r in receipts} == set(job_ids(broker))
    assert sum(not r.duplicate for r in receipts) == 1
    assert {r.offset for r in receipts} == {0}


async def test_producers_sharing_a_store_see_one_key(
    broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    producers = [
        JobProducer(settings(), publisher=MemoryPublisher(broker), unique_store=store)
        for _ in range(4)
    ]
    for p in producers:
        await p.start()
    receipts = await asyncio.gather(
        *(p.publish(JOB, unique_key="k", unique_for=60) for p in producers for _ in range(25))
    )
    for p in producers:
        await p.stop()
    assert len(job_ids(broker)) == 1
    assert {r.job_id for r in receipts} == set(job_ids(broker))


async def test_a_publish_after_the_window_creates_a_second_job(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    first = await producer.publish(JOB, unique_key="k", unique_for=timedelta(milliseconds=50))
    inside = await producer.publish(JOB, unique_key="k", unique_for=3600)
    assert (inside.job_id, inside.duplicate) == (first.job_id, True)
    rec = await record(store, "k")
    assert rec is not None
    await asyncio.sleep(max(rec.window_until - time.time(), 0) + 0.01)  # the window is over
    second = await producer.publish(JOB, unique_key="k", unique_for=60)
    assert not second.duplicate
    assert job_ids(broker) == [first.job_id, second.job_id]
    assert first.job_id != second.job_id


async def test_a_definite_failure_releases_the_key(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    broker.faults.fail_appends(1)  # BrokerUnavailable: nothing stored
    with pytest.raises(BrokerUnavailable) as failed:
        await producer.publish(JOB, unique_key="k", unique_for=60)
    assert await store.get("k") is None
    receipt = await producer.publish(JOB, unique_key="k", unique_for=60)
    assert not receipt.duplicate
    assert receipt.job_id != failed.value.job_id
    assert job_ids(broker) == [receipt.job_id]


async def test_an_ambiguous_timeout_keeps_the_job_id_for_the_next_publish(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    broker.faults.fail_appends(1, PublishTimeout("memory", TOPIC, 1.0))
    with pytest.raises(PublishTimeout) as timed_out:
        await producer.publish(JOB, unique_key="k", unique_for=60)
    kept = await record(store, "k")
    assert kept is not None
    assert kept.job_id == timed_out.value.job_id
    assert kept.receipt is None
    assert kept.lease_until <= time.time()  # no wait for the next publish
    receipt = await producer.publish(JOB, unique_key="k", unique_for=60)
    assert (receipt.job_id, receipt.duplicate) == (timed_out.value.job_id, False)
    assert job_ids(broker) == [receipt.job_id]


async def test_a_publish_waits_for_a_reserved_key_and_gets_its_receipt(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    broker.faults.delay_acks(0.3)
    holder = asyncio.create_task(producer.publish(JOB, unique_key="k", unique_for=60))
    for _ in range(1000):  # until the holder reserved the key
        if await store.get("k") is not None:
            break
        await asyncio.sleep(0.001)
    held = await record(store, "k")
    assert held is not None
    assert held.receipt is None
    waiter = await producer.publish(JOB, unique_key="k", unique_for=60)
    first = await holder
    assert (waiter.job_id, waiter.duplicate, first.duplicate) == (first.job_id, True, False)
    assert job_ids(broker) == [first.job_id]


async def test_a_dead_publishers_reservation_is_taken_over_with_its_job_id(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    now = time.time()
    dead = UniqueRecord("job-of-the-dead", "gone", lease_until=now - 1, window_until=now + 60)
    assert await store.put("k", dead.dumps(), None, 60)
    receipt = await producer.publish(JOB, unique_key="k", unique_for=60, id="my-own-id")
    assert (receipt.job_id, receipt.duplicate) == ("job-of-the-dead", False)
    assert job_ids(broker) == ["job-of-the-dead"]
    rec = await record(store, "k")
    assert rec is not None
    assert rec.receipt == receipt
    assert rec.window_until == dead.window_until  # the first claim's window


async def test_takeover_and_waiting_bound_on_a_fake_clock() -> None:
    clock = Clock()
    store = MemoryUniqueStore(clock)
    keys = UniqueKeys(store, UniqueSettings(lease_s=0.05), "memory", clock=clock)
    first = await keys.reserve("k", "j1", 60)
    assert isinstance(first, Reservation)
    assert not first.taken_over
    started = time.monotonic()
    with pytest.raises(UniqueKeyBusy, match="'k'"):  # the clock stands still: a live lease
        await keys.reserve("k", "j2", 60)
    assert time.monotonic() - started < 5  # bounded by twice the lease (0.1 s)
    clock.now += 0.05  # the lease ran out: its publisher died
    second = await keys.reserve("k", "j2", 60)
    assert isinstance(second, Reservation)
    assert (second.job_id, second.taken_over) == ("j1", True)
    await keys.published(first, Receipt("j1", "memory", TOPIC, 0, 0))  # late, still counts
    dup = await keys.reserve("k", "j3", 60)
    assert dup == Receipt("j1", "memory", TOPIC, 0, 0, duplicate=True)
    clock.now += 60  # the window is over
    assert isinstance(await keys.reserve("k", "j4", 60), Reservation)


async def test_publish_many_claims_unique_requests_and_keeps_input_order(
    producer: JobProducer, broker: MemoryBroker
) -> None:
    before = await producer.publish(JOB, unique_key="a", unique_for=60)
    receipts = await producer.publish_many(
        [
            PublishRequest(JOB, unique_key="a", unique_for=60),  # a duplicate of `before`
            PublishRequest(JOB),
            PublishRequest(JOB, unique_key="b", unique_for=60),
            PublishRequest(JOB, unique_key="b", unique_for=60),  # same call, same key
            JOB,
        ]
    )
    assert [r.duplicate for r in receipts] == [True, False, False, True, False]
    assert receipts[0].job_id == before.job_id
    assert receipts[2].job_id == receipts[3].job_id
    stored = job_ids(broker)
    assert len(stored) == 4
    assert stored[0] == before.job_id
    assert sorted(stored[1:]) == sorted(receipts[i].job_id for i in (1, 2, 4))


async def test_a_failed_batch_keeps_each_keys_job_id(
    producer: JobProducer, broker: MemoryBroker, store: MemoryUniqueStore
) -> None:
    broker.faults.fail_appends(1)
    with pytest.raises(BrokerUnavailable):
        await producer.publish_many([PublishRequest(JOB, unique_key="k", unique_for=60)])
    kept = await record(store, "k")
    assert kept is not None  # a batch may be partly stored: the key keeps its job id
    [receipt] = await producer.publish_many([PublishRequest(JOB, unique_key="k", unique_for=60)])
    assert receipt.job_id == kept.job_id
    assert job_ids(broker) == [kept.job_id]


async def test_a_spooled_receipt_counts_as_published(broker: MemoryBroker) -> None:
    path = Path(tempfile.mkdtemp()) / "spool.db"
    unique = {"url": "memory"}
    config = ProducerSettings(transport="memory", spool={"path": path}, unique=unique)
    async with JobProducer(config, publisher=MemoryPublisher(broker)) as producer:
        broker.faults.disconnect()
        first = await producer.publish(JOB, unique_key="k", unique_for=60)
        again = await producer.publish(JOB, unique_key="k", unique_for=60)
        assert first.spooled
        assert (again.job_id, again.spooled, again.duplicate) == (first.job_id, True, True)
        broker.faults.reconnect()
        await producer.flush_spool()
    assert job_ids(broker) == [first.job_id]


class BrokenStore(MemoryUniqueStore):
    """A store that refuses every call (or, with `hang`, never answers)."""

    def __init__(self, *, hang: bool = False, fail_writes_only: bool = False) -> None:
        super().__init__()
        self.hang = hang
        self.fail_writes_only = fail_writes_only
        self.calls = 0

    async def _fail(self) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        raise ConnectionError("connection refused")

    async def get(self, key: str) -> Stored | None:
        if not self.fail_writes_only:
            await self._fail()
        return await super().get(key)

    async def put(self, key: str, value: str, expected: Stored | None, ttl_s: float) -> bool:
        if self.fail_writes_only and 'receipt":null' in value:
            return await super().put(key, value, expected, ttl_s)  # the claim works
        await self._fail()
        return False


@pytest.mark.parametrize("hang", [False, True])
async def test_a_store_that_is_down_fails_the_publish_clearly(
    broker: MemoryBroker, hang: bool
) -> None:
    store = BrokenStore(hang=hang)
    config = settings(timeout_s=0.05)
    async with JobProducer(config, publisher=MemoryPublisher(broker), unique_store=store) as p:
        with pytest.raises(UniqueStoreUnavailable) as failed:
            await p.publish(JOB, unique_key="k", unique_for=60)
        assert failed.value.retriable
        assert "JOBSTREAM_UNIQUE__URL" in str(failed.value)
        assert ("0.05s" in str(failed.value)) == hang
        # A publish without a unique key never touches the store.
        calls = store.calls
        await p.publish(JOB)
        assert store.calls == calls
    assert len(job_ids(broker)) == 1


async def test_a_settle_the_store_misses_still_returns_the_receipt(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore(fail_writes_only=True)
    async with JobProducer(settings(), publisher=MemoryPublisher(broker), unique_store=store) as p:
        with caplog.at_level(logging.WARNING, "jobstream.producer"):
            receipt = await p.publish(JOB, unique_key="k", unique_for=60)
    assert job_ids(broker) == [receipt.job_id]
    assert "stays reserved until its lease ends" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unique_for": 60}, "unique_for needs a unique_key"),
        ({"unique_key": "k"}, "unique_key needs unique_for"),
        ({"unique_key": "", "unique_for": 60}, "1 to 512 bytes"),
        ({"unique_key": "é" * 300, "unique_for": 60}, "1 to 512 bytes"),
        ({"unique_key": "k", "unique_for": 0}, "> 0"),
        ({"unique_key": "k", "unique_for": float("inf")}, "finite"),
        ({"unique_key": "k", "unique_for": timedelta(days=8)}, "unique.max_for_s"),
        ({"unique_key": "k", "unique_for": 60, "priority": "high"}, "routing.priorities"),
    ],
)
async def test_bad_unique_options_raise_before_anything_is_held(
    producer: JobProducer,
    broker: MemoryBroker,
    store: MemoryUniqueStore,
    options: dict[str, object],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        await producer.publish(JOB, **options)  # type: ignore[arg-type]
    assert len(store) == 0
    assert job_ids(broker) == []


async def test_a_unique_key_without_a_store_says_which_setting_to_set(
    broker: MemoryBroker,
) -> None:
    async with JobProducer(
        ProducerSettings(transport="memory"), publisher=MemoryPublisher(broker)
    ) as p:
        with pytest.raises(ValueError, match=r"JOBSTREAM_UNIQUE__URL") as failed:
            await p.publish(JOB, unique_key="k", unique_for=60)
        assert "\n" not in str(failed.value)
        assert (await p.publish(JOB)).job_id  # no unique key: no store needed


def test_the_sync_producer_passes_unique_keys_through(broker: MemoryBroker) -> None:
    with SyncJobProducer(settings(), publisher=MemoryPublisher(broker)) as producer:
        first = producer.publish(JOB, unique_key="k", unique_for=60)
        again = producer.publish(JOB, unique_key="k", unique_for=60)
    assert (again.job_id, again.duplicate) == (first.job_id, True)
    assert job_ids(broker) == [first.job_id]


def test_unique_settings_check_the_url_and_namespace() -> None:
    for url in ("memory", "redis://r:6379/0", "postgresql://u@h/db", "nats://", "host=h"):
        assert UniqueSettings(url=url).url is not None
    for bad in ("mysql://h/db", "memoryx"):
        with pytest.raises(ValidationError, match=r"unique\.url must start with"):
            UniqueSettings(url=bad)
    with pytest.raises(ValidationError, match=r"unique\.namespace"):
        UniqueSettings(namespace="a b")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (UniqueStoreUnavailable("redis://r:6379", "refused"), "unique-store-unavailable"),
        (UniqueKeyBusy("k", 60.0), "unique-key-busy"),
    ],
)
def test_unique_errors_are_retriable_publish_errors_and_pickle(
    error: PublishError, reason: str
) -> None:
    assert (error.retriable, error.reason) == (True, reason)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy)) == (type(error), str(error))


def test_store_addresses_in_errors_carry_no_credentials() -> None:
    assert _redacted("redis://:s3cret@redis:6379/0") == "redis://redis:6379"
    assert _redacted("postgresql://u:pw@db/x") == "postgresql://db"
    assert "pw" not in str(UniqueStoreUnavailable(_redacted("postgresql://u:pw@db/x"), "down"))
