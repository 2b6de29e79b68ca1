"""`producer.retrying`, and the backoff loops built on it, without a broker.

Each loop keeps its rule: what it retries, its budget and the error it raises when the
budget runs out, its log line, and that cancellation is never retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from consumer import ClaimState, MemoryIdempotencyStore
from consumer.core import (
    Delivery,
    IdempotencySettings,
    JobRun,
    Outcome,
    Settings,
    WorkerError,
)
from consumer.kafka._source import KafkaSource
from consumer.runtime import until_acknowledged, until_reachable
from consumer.steps import IdempotencyStep
from producer import BrokerUnavailable, KafkaSettings, PublishError, Receipt
from producer.kafka import KafkaPublisher
from producer.kafka._provision import _wait_for_leaders
from producer.retrying import Backoff, is_testing, retry, set_testing
from schemas import JobAttributes


@pytest.fixture
def no_waits() -> Iterator[None]:
    set_testing(True)
    try:
        yield
    finally:
        set_testing(False)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, logger: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger]


@pytest.fixture
def logged() -> Iterator[Records]:
    handler = Records()
    logging.getLogger("jobstream").addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger("jobstream").removeHandler(handler)


class Flaky:
    """Fails `failures` times with `error`, then returns `result`; records each call."""

    def __init__(self, failures: int, error: Exception, result: Any = "ok") -> None:
        self.failures, self.error, self.result = failures, error, result
        self.calls: list[float] = []

    async def __call__(self) -> Any:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise self.error
        return self.result


# -- Backoff ----------------------------------------------------------------------------


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    backoff = Backoff(initial_s=0.5, max_s=10.0)
    assert [backoff.nominal(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.nominal(100_000) == 10.0, "a long outage does not overflow"
    # The first wait is the initial one even above the cap, as the claim wait had it.
    assert [Backoff(0.05, 0.02).nominal(n) for n in (1, 2, 3)] == [0.05, 0.02, 0.02]


def test_jitter_is_half_to_one_and_a_half_times_the_wait_but_never_past_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, max_s=4.0, jitter=True)
    waits = [backoff.wait(1) for _ in range(500)]
    assert all(0.5 <= wait < 1.5 for wait in waits)
    assert len(set(waits)) > 1
    # At the cap the jitter may only shorten the wait: the longest wait is `max_s`.
    capped = [backoff.wait(n) for n in (3, 4, 10) for _ in range(300)]
    assert all(wait <= 4.0 for wait in capped)
    assert min(capped) < 3.0
    assert Backoff(initial_s=1.0, max_s=1.0).wait(3) == 1.0


# -- retry ------------------------------------------------------------------------------


async def test_retries_the_named_errors_and_reports_each_wait(no_waits: None) -> None:
    operation = Flaky(3, OSError("down"))
    seen: list[tuple[str, float]] = []
    started = time.monotonic()
    result = await retry(
        operation,
        on=OSError,
        backoff=Backoff(initial_s=10.0, max_s=40.0),
        on_retry=lambda error, wait: seen.append((str(error), wait)),
    )
    assert result == "ok"
    assert seen == [("down", 10.0), ("down", 20.0), ("down", 40.0)]
    assert time.monotonic() - started < 1.0, "testing mode: the waits are zero"


async def test_an_operation_may_be_a_lambda_returning_an_awaitable(no_waits: None) -> None:
    operation = Flaky(2, OSError("down"))

    def plain() -> Awaitable[Any]:  # not a coroutine function: tenacity alone would not await it
        return operation()

    assert await retry(plain, on=OSError, backoff=Backoff(1, 1)) == "ok"
    assert len(operation.calls) == 3


async def test_a_first_attempt_that_succeeds_is_a_plain_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-job path (an idempotency claim) pays nothing for `retry` when all is well:
    one call, and no retry machinery is built."""
    import tenacity

    def no_machinery(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tenacity was used for an attempt that succeeded")

    monkeypatch.setattr(tenacity, "AsyncRetrying", no_machinery)
    calls = 0

    async def claim() -> str:
        nonlocal calls
        calls += 1
        return "claimed"

    backoff = Backoff(initial_s=1.0, max_s=1.0)
    assert await retry(claim, on=Exception, backoff=backoff) == "claimed"
    assert await retry(claim, until=lambda r: r == "claimed", backoff=backoff) == "claimed"
    assert calls == 2


async def test_a_failed_first_attempt_is_not_called_twice(no_waits: None) -> None:
    outcomes: list[Exception | str] = [OSError("down"), OSError("still down"), "up"]
    calls: list[int] = []
    waits: list[float] = []

    async def connect() -> str:
        calls.append(len(calls) + 1)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    backoff = Backoff(initial_s=0.5, max_s=4.0)
    found = await retry(connect, on=OSError, backoff=backoff, on_retry=lambda e, w: waits.append(w))
    assert (found, calls, waits) == ("up", [1, 2, 3], [0.5, 1.0])


async def test_other_errors_propagate_at_once() -> None:
    operation = Flaky(5, ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        await retry(operation, on=OSError, backoff=Backoff(0.01, 0.01))
    assert len(operation.calls) == 1


async def test_a_predicate_decides_what_is_retried() -> None:
    operation = Flaky(5, OSError("closed"))
    with pytest.raises(OSError, match="closed"):
        await retry(operation, on=lambda error: "closed" not in str(error), backoff=Backoff(0, 0))
    assert len(operation.calls) == 1


async def test_cancellation_is_never_retried() -> None:
    operation = Flaky(5, asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await retry(operation, on=Exception, backoff=Backoff(0.01, 0.01))
    assert len(operation.calls) == 1


async def test_cancellation_ends_a_wait() -> None:
    task = asyncio.create_task(
        retry(Flaky(5, OSError("down")), on=OSError, backoff=Backoff(30.0, 30.0))
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_deadline_raises_the_last_error_and_no_wait_ends_past_it() -> None:
    operation = Flaky(100, OSError("down"))
    started = time.monotonic()
    with pytest.raises(OSError, match="down"):
        await retry(
            operation,
            on=OSError,
            backoff=Backoff(initial_s=0.05, max_s=0.2, jitter=True),
            deadline=started + 0.5,
        )
    assert len(operation.calls) >= 2
    assert time.monotonic() - started < 0.5 + 0.2, "gave up within the budget (and some slack)"


async def test_last_try_at_deadline_shortens_the_last_wait() -> None:
    operation = Flaky(100, OSError("down"))
    started = time.monotonic()
    with pytest.raises(OSError, match="down"):
        await retry(
            operation,
            on=OSError,
            backoff=Backoff(initial_s=0.2, max_s=0.2),
            deadline=started + 0.5,
            last_try_at_deadline=True,
        )
    offsets = [call - started for call in operation.calls]
    assert len(offsets) == 4, offsets  # at 0, 0.2, 0.4 and, after a shortened wait, 0.5
    assert 0.5 <= offsets[-1] < 0.5 + 0.2, offsets


async def test_testing_mode_judges_a_deadline_as_if_it_had_waited(no_waits: None) -> None:
    operation = Flaky(100, OSError("down"))
    started = time.monotonic()
    with pytest.raises(OSError, match="down"):
        await retry(
            operation,
            on=OSError,
            backoff=Backoff(initial_s=0.5, max_s=10.0, jitter=True),
            deadline=started + 2.0,
        )
    assert len(operation.calls) == 3  # waits of 0.5 and 1 fit into 2 s, one of 2 does not
    assert time.monotonic() - started < 0.5
    assert is_testing()


async def test_until_polls_while_the_result_is_rejected(no_waits: None) -> None:
    results = iter([["a", "b"], ["b"], []])

    async def leaderless() -> list[str]:
        return next(results)

    assert await retry(leaderless, until=lambda left: not left, backoff=Backoff(1, 1)) == []


# -- the loops --------------------------------------------------------------------------


def settings(broker_wait_s: float) -> Settings:
    return Settings.model_validate({"worker": {"broker_wait_s": broker_wait_s}})


async def test_nats_unreachable_at_start_is_one_error_within_the_budget(logged: Records) -> None:
    connect = Flaky(100, BrokerUnavailable("nats", "127.0.0.1:1", "refused"))
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"gave up after 1s: worker\.broker_wait_s"):
        await until_reachable(settings(1.0), connect)
    assert time.monotonic() - started < 1.0 + 0.3
    assert len(connect.calls) >= 2
    retried = logged.messages("jobstream.worker")
    assert retried and all(m.startswith("nats is not reachable at ") for m in retried)


async def test_kafka_source_unreachable_at_start_stops_the_client(no_waits: None) -> None:
    source = KafkaSource(settings(3.0), ["jobs.a"])
    await source._consumer.stop()  # the real client, never started: closed, not leaked
    fake = FakeConsumer()
    source._consumer = fake  # type: ignore[assignment]
    with pytest.raises(WorkerError, match="did not answer within 3s") as caught:
        await source.start(on_revoke=lambda partitions: asyncio.sleep(0))
    assert "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS" in str(caught.value)
    assert fake.starts == 3 and fake.stopped  # waits of 0.5 and 1 fit into 3 s, 2 does not


class FakeConsumer:
    def __init__(self) -> None:
        self.starts, self.stopped = 0, False

    async def start(self) -> None:
        self.starts += 1
        raise KafkaConnectionError("refused")

    async def stop(self) -> None:
        self.stopped = True


async def test_kafka_publisher_tries_last_at_the_connect_timeout() -> None:
    publisher = KafkaPublisher(
        KafkaSettings(bootstrap_servers="127.0.0.1:1", connect_timeout_s=0.5)
    )
    producers: list[FakeProducer] = []

    def new_producer() -> FakeProducer:
        producers.append(FakeProducer())
        return producers[-1]

    publisher._new_producer = new_producer  # type: ignore[method-assign,assignment]
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        await publisher.start()
    last = producers[-1].started_at - started
    assert 0.5 <= last < 0.5 + 0.2, last  # waits 0.1, 0.2, then shortened to end at 0.5
    assert len(producers) == 4 and all(p.stopped for p in producers)


class FakeProducer:
    def __init__(self) -> None:
        self.started_at, self.stopped = 0.0, False

    async def start(self) -> None:
        self.started_at = time.monotonic()
        raise KafkaConnectionError("refused")

    async def stop(self) -> None:
        self.stopped = True


async def test_a_hand_off_is_retried_until_acknowledged(no_waits: None, logged: Records) -> None:
    receipt = Receipt("job-1", "kafka", "jobs.a.retry-1", 0, 7, False)
    away = BrokerUnavailable("kafka", "k:9092", "broker away")
    publish = Flaky(3, away, result=receipt)
    assert await until_acknowledged(publish, 60) is receipt
    messages = logged.messages("jobstream.routing")
    assert len(messages) == 3
    assert messages[0].startswith("could not hand a failed job on (kafka is not reachable")


async def test_a_hand_off_refused_for_good_is_not_retried(no_waits: None) -> None:
    receipt = Receipt("job-1", "kafka", "jobs.a.retry-1", 0, 7, False)
    publish = Flaky(3, PublishError("refused for good"), result=receipt)
    with pytest.raises(PublishError, match="refused for good"):
        await until_acknowledged(publish, 60)
    assert len(publish.calls) == 1


async def test_a_hand_off_waits_for_the_broker_only_so_long(no_waits: None) -> None:
    receipt = Receipt("job-1", "kafka", "jobs.a.retry-1", 0, 7, False)
    publish = Flaky(1000, BrokerUnavailable("kafka", "k:9092", "away"), result=receipt)
    with pytest.raises(WorkerError, match="hand_off_timeout_s"):
        await until_acknowledged(publish, 30)
    assert 3 < len(publish.calls) < 20


async def test_leaders_are_awaited_for_the_topics_still_without_one(no_waits: None) -> None:
    class Admin:
        def __init__(self) -> None:
            self.asked: list[list[str]] = []

        async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
            self.asked.append(list(topics))
            leader = -1 if len(self.asked) == 1 and "b" in topics else 0
            return [
                {"topic": t, "error_code": 0, "partitions": [{"leader": leader if t == "b" else 0}]}
                for t in topics
            ]

    admin = Admin()
    await _wait_for_leaders(admin, ["a", "b"])  # type: ignore[arg-type]
    assert admin.asked == [["a", "b"], ["b"]]


async def test_an_idempotency_store_outage_is_waited_out(no_waits: None, logged: Records) -> None:
    store = MemoryIdempotencyStore()
    claim, outages = store.claim, [ConnectionError("store away")]

    async def flaky_claim(key: str, owner: str, lease_s: float) -> ClaimState:
        if outages:
            raise outages.pop()
        return await claim(key, owner, lease_s)

    store.claim = flaky_claim  # type: ignore[method-assign]
    step = IdempotencyStep(store, IdempotencySettings(lease_s=30), owner="w1")
    assert await step(run_for("a"), completed) is Outcome.COMPLETED
    assert logged.messages("jobstream.idempotency") == [
        "idempotency store unavailable (store away); retrying in 0.1s"
    ]


async def test_a_job_another_worker_holds_waits_for_its_lease() -> None:
    store = MemoryIdempotencyStore()
    assert await store.claim("a", "w2", 0.3) is ClaimState.CLAIMED
    step = IdempotencyStep(store, IdempotencySettings(lease_s=0.3), owner="w1")
    started = time.monotonic()
    assert await step(run_for("a"), completed) is Outcome.COMPLETED
    assert 0.3 <= time.monotonic() - started < 0.3 + 0.3  # polled at most lease/4 apart


def run_for(job_id: str) -> JobRun:
    attributes = JobAttributes(id=job_id, type="t.x", source="/t", time=datetime.now(UTC))
    delivery = Delivery(partition=0, offset=0, topic="t", attributes=attributes, body=b"{}")
    return JobRun(delivery, None, None, None)


async def completed(_: JobRun) -> Outcome:
    return Outcome.COMPLETED
