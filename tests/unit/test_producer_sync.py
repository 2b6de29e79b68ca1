"""`SyncJobProducer` keeps `JobProducer`'s promises from synchronous code: receipts after
the acknowledgement, thread-safety, the caller's trace context, bounded calls whose
timeout keeps the job id, a clean stop, and a working producer in a forked child."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from producer import BrokerUnavailable, ProducerSettings, PublishTimeout, SyncJobProducer
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import InvalidPayload, from_kafka
from schemas.examples import GenerateReport

TOPIC = "jobs.report.generate"
SETTINGS = ProducerSettings(transport="memory", create_missing=True)


def report(n: int) -> GenerateReport:
    return GenerateReport(account_id=f"acct-{n}", month="2025-01")


def stored(broker: MemoryBroker) -> list[str]:
    return [
        from_kafka(record.key, record.headers).id
        for partition in range(broker.partitions(TOPIC))
        for record in broker.read(TOPIC, partition, 0, max_records=1_000_000)
    ]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(auto_create=True)


@pytest.fixture
def producer(broker: MemoryBroker) -> Iterator[SyncJobProducer]:
    sync = SyncJobProducer(SETTINGS, publisher=MemoryPublisher(broker), call_timeout_s=5)
    yield sync
    sync.stop()


def test_eight_threads_publish_2000_jobs_each_stored_once(
    producer: SyncJobProducer, broker: MemoryBroker
) -> None:
    receipts: list[list[str]] = [[] for _ in range(8)]

    def publish(thread: int) -> None:
        for n in range(250):
            receipt = producer.publish(report(n), key=f"k{thread}", id=f"t{thread}-{n}")
            receipts[thread].append(receipt.job_id)

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    expected = {f"t{t}-{n}" for t in range(8) for n in range(250)}
    assert {i for ids in receipts for i in ids} == expected
    ids = stored(broker)
    assert len(ids) == 2000
    assert set(ids) == expected
    # Per key (one thread each), the broker holds the jobs in publish order.
    for t in range(8):
        mine = [i for i in ids if i.startswith(f"t{t}-")]
        assert mine == [f"t{t}-{n}" for n in range(250)]


def test_publish_many_and_publish_data_return_receipts_in_order(
    producer: SyncJobProducer, broker: MemoryBroker
) -> None:
    receipts = producer.publish_many([report(n) for n in range(50)])
    assert [r.offset for r in receipts] == list(range(50))
    data = producer.publish_data("report.generate", {"account_id": "a", "month": "2025-02"})
    assert stored(broker) == [r.job_id for r in receipts] + [data.job_id]
    with pytest.raises(InvalidPayload):
        producer.publish_data("report.generate", {"account_id": "a"})
    assert len(stored(broker)) == 51  # nothing sent for the invalid payload


def test_the_callers_span_is_the_jobs_origin(broker: MemoryBroker) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sync = SyncJobProducer(SETTINGS, publisher=MemoryPublisher(broker), tracer_provider=provider)
    try:
        with provider.get_tracer("view").start_as_current_span("GET /signup") as span:
            sync.publish(report(1))
        caller = span.get_span_context()
    finally:
        sync.stop()
        provider.shutdown()
    record = broker.read(TOPIC, 0, 0)[0]
    attributes = from_kafka(record.key, record.headers)
    assert attributes.origin_traceparent is not None
    assert attributes.origin_traceparent.split("-")[1:3] == [
        f"{caller.trace_id:032x}",
        f"{caller.span_id:016x}",
    ]
    sends = [s for s in exporter.get_finished_spans() if s.name == f"send {TOPIC}"]
    assert len(sends) == 1
    assert sends[0].parent is not None and sends[0].parent.span_id == caller.span_id


def test_a_call_past_its_bound_raises_publish_timeout_with_the_job_id(
    broker: MemoryBroker,
) -> None:
    sync = SyncJobProducer(SETTINGS, publisher=MemoryPublisher(broker), call_timeout_s=0.3)
    try:
        sync.start()
        broker.faults.delay_acks(2.0)
        with pytest.raises(PublishTimeout) as raised:
            sync.publish(report(1), id="job-slow")
        assert raised.value.job_id == "job-slow"
        with pytest.raises(PublishTimeout) as generated:
            sync.publish(report(2))
        assert generated.value.job_id is not None
        broker.faults.delay_acks(0)
        # The caller publishes again under the id the error named: one more record.
        assert sync.publish(report(2), id=generated.value.job_id).job_id == generated.value.job_id
    finally:
        sync.stop()
    assert stored(broker)[-1] == generated.value.job_id


def test_broker_down_at_start_raises_and_leaves_no_thread(broker: MemoryBroker) -> None:
    settings = ProducerSettings(transport="kafka", kafka={"bootstrap_servers": "127.0.0.1:1"})
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"connect_timeout_s": 0.5})}
    )
    before = {t.name for t in threading.enumerate()}
    sync = SyncJobProducer(settings, call_timeout_s=10)
    with pytest.raises(BrokerUnavailable):
        sync.publish(report(1))
    assert "jobstream-producer" not in {t.name for t in threading.enumerate()} - before


def test_stop_is_idempotent_and_a_later_publish_starts_again(
    producer: SyncJobProducer, broker: MemoryBroker
) -> None:
    producer.publish(report(1))
    producer.stop()
    producer.stop()
    assert not [t for t in threading.enumerate() if t.name == "jobstream-producer"]
    producer.publish(report(2))
    assert len(stored(broker)) == 2


_FORKED: dict[str, SyncJobProducer] = {}
"""The producer a forked child inherits (module state is copied by the fork)."""


def _publish_in_child(queue: multiprocessing.Queue[str]) -> None:
    producer = _FORKED["producer"]
    queue.put(producer.publish(report(7), id="from-child").job_id)
    producer.stop()


def test_a_forked_child_publishes_on_a_loop_of_its_own() -> None:
    producer = _FORKED["producer"] = SyncJobProducer(SETTINGS, call_timeout_s=5)
    try:
        first = producer.publish(report(1), key="k").offset  # the shared memory broker
        context = multiprocessing.get_context("fork")
        queue: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_publish_in_child, args=(queue,))
        child.start()
        child.join(20)
        assert child.exitcode == 0
        assert queue.get(timeout=1) == "from-child"
        assert producer.publish(report(2), key="k").offset == first + 1  # the parent's loop
    finally:
        producer.stop()
        _FORKED.clear()


def unreachable(connect_timeout_s: float) -> ProducerSettings:
    kafka = {"bootstrap_servers": "127.0.0.1:1", "connect_timeout_s": connect_timeout_s}
    return ProducerSettings(transport="kafka", kafka=kafka)


def test_threads_share_one_connect_attempt_instead_of_queueing_behind_it() -> None:
    sync = SyncJobProducer(unreachable(1.0), call_timeout_s=10)
    took: list[float] = []
    errors: list[BaseException] = []

    def publish() -> None:
        began = time.monotonic()
        try:
            sync.publish(report(1))
        except BrokerUnavailable as error:
            errors.append(error)
        took.append(time.monotonic() - began)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    sync.stop()
    assert len(errors) == 6
    # One connect attempt of about 1 s, shared: not 1, 2, 3 ... 6 s one after the other.
    assert max(took) < 3.0, took


def test_a_call_timeout_shorter_than_the_connect_is_broker_unavailable() -> None:
    sync = SyncJobProducer(unreachable(5.0), call_timeout_s=0.5)
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"call timeout of 0\.5s"):
        sync.publish(report(1))
    assert time.monotonic() - began < 2.0
    assert not [t for t in threading.enumerate() if t.name == "jobstream-producer"]


class _HangingStop(MemoryPublisher):
    """A publisher whose stop waits for a broker that never answers."""

    async def stop(self) -> None:
        await asyncio.sleep(3600)


def test_stop_with_a_broker_that_never_answers_is_bounded_and_does_not_raise(
    broker: MemoryBroker,
) -> None:
    sync = SyncJobProducer(SETTINGS, publisher=_HangingStop(broker), call_timeout_s=0.5)
    sync.publish(report(1))
    began = time.monotonic()
    sync.stop()
    assert time.monotonic() - began < 2.0
    assert not [t for t in threading.enumerate() if t.name == "jobstream-producer"]


def _publish_in_a_forked_child(result: multiprocessing.Queue[str]) -> None:
    producer = _FORKED["producer"]
    try:
        producer.publish(report(1))
    except BrokerUnavailable:
        result.put("broker-unavailable")
    except BaseException as error:  # reported to the parent, whatever it is
        result.put(repr(error))


def test_a_fork_while_another_thread_connects_does_not_hang_the_child() -> None:
    producer = _FORKED["producer"] = SyncJobProducer(unreachable(2.0), call_timeout_s=4)

    def connect() -> None:
        with contextlib.suppress(BrokerUnavailable):
            producer.publish(report(0))

    connecting = threading.Thread(target=connect)
    try:
        connecting.start()
        time.sleep(0.5)  # the other thread holds the connect under way
        context = multiprocessing.get_context("fork")
        result: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_publish_in_a_forked_child, args=(result,))
        child.start()
        child.join(20)
        assert child.exitcode == 0
        assert result.get(timeout=1) == "broker-unavailable"
    finally:
        connecting.join(10)
        producer.stop()
        _FORKED.clear()
