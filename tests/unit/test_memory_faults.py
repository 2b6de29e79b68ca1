"""Each fault of the memory broker changes what the workers do, and nothing is lost:
failed hand-offs, a dropped connection, slow acknowledgements, oversized records, forced
rebalances, redelivery, and a worker killed mid-job."""

from __future__ import annotations

import asyncio
import collections
import pickle
import time
from collections.abc import Callable

import pytest

from consumer import App, JobContext
from consumer.core import Outcome
from consumer.memory import MemorySource, TestApp
from producer import BrokerUnavailable, PublishError, PublishRequest, PublishTimeout, Receipt
from producer.memory import CommitFailed, MemoryBroker, RecordTooLarge, TopicPartition
from tests.unit.test_memory_backend import TOPIC, Step, fast


class Runs:
    """Handler runs by job id (started, finished) and the order of finishes; `until`
    waits for a condition on them."""

    def __init__(self) -> None:
        self.started: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.order: list[tuple[str, int]] = []
        self._changed = asyncio.Event()

    def start(self, job: Step, ctx: JobContext) -> None:
        self.started[ctx.job_id] += 1
        self._changed.set()

    def finish(self, job: Step, ctx: JobContext) -> None:
        self.finished[ctx.job_id] += 1
        self.order.append((job.key, job.seq))
        self._changed.set()

    async def until(self, ready: Callable[[], bool], timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not ready():
                self._changed.clear()
                await self._changed.wait()


def gated_app(runs: Runs, gate: asyncio.Event, *, gate_seq: int | None = None) -> App:
    """Every job (or only `gate_seq`) waits for `gate` before it finishes."""
    app = App("faults")

    @app.handler(Step)
    async def handle(job: Step, ctx: JobContext) -> None:
        runs.start(job, ctx)
        if gate_seq is None or job.seq == gate_seq:
            await gate.wait()
        else:
            await asyncio.sleep(0)
        if ctx.attempt <= job.fail_times:
            raise RuntimeError(f"attempt {ctx.attempt} fails")
        runs.finish(job, ctx)

    return app


def open_gate() -> asyncio.Event:
    gate = asyncio.Event()
    gate.set()
    return gate


def committed_to_the_end(t: TestApp, topics: list[str]) -> bool:
    group, broker = t.settings.worker.group, t.broker
    return all(
        (broker.committed(group, topic, p) or 0) == broker.end_offset(topic, p)
        for topic in topics
        for p in range(broker.partitions(topic))
    )


def in_key_order(order: list[tuple[str, int]]) -> bool:
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for key, seq in order:
        by_key[key].append(seq)
    return all(seqs == sorted(seqs) for seqs in by_key.values())


async def publish_keyed(t: TestApp, count: int, keys: int) -> list[Receipt]:
    keyed = [(f"k{n % keys}", n) for n in range(count)]
    return await t.publish_many([PublishRequest(Step(key=k, seq=n), key=k) for k, n in keyed])


# -- the broker's faults, one call at a time --------------------------------------------------


async def test_fail_appends_refuses_the_next_n_and_stores_nothing() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.faults.fail_appends(2)
    for _ in range(2):
        with pytest.raises(BrokerUnavailable, match="fail_appends"):
            await broker.append("t", None, [], b"x")
    broker.faults.fail_appends(1, PublishTimeout("memory", "t", 1.0))
    with pytest.raises(PublishTimeout):
        await broker.append("t", None, [], b"x")
    record = await broker.append("t", None, [], b"x")
    assert (record.offset, broker.end_offset("t", 0), broker.faults.failed_appends) == (0, 1, 3)


async def test_oversized_records_are_refused_with_a_typed_publish_error() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.faults.limit_record_bytes(10)
    await broker.append("t", b"k", [("h", b"v")], b"1234567")  # 1 + 2 + 7 = 10 bytes
    with pytest.raises(RecordTooLarge, match=r"11 bytes .* limit of 10 bytes") as raised:
        await broker.append("t", b"k", [("h", b"v")], b"12345678")
    error = raised.value
    assert isinstance(error, PublishError)
    assert (error.retriable, error.reason) == (False, "record-too-large")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    broker.faults.limit_record_bytes(None)
    await broker.append("t", b"k", [("h", b"v")], b"12345678")
    assert broker.end_offset("t", 0) == 2


async def test_delayed_acks_and_commits_take_their_time_and_reset_turns_faults_off() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.faults.delay_acks(0.2)
    wall = time.monotonic()
    await broker.append("t", None, [], b"x")
    assert time.monotonic() - wall >= 0.19
    broker.faults.disconnect()
    broker.faults.reset()
    assert broker.faults.connected
    wall = time.monotonic()
    await broker.append("t", None, [], b"x")
    assert time.monotonic() - wall < 0.1


async def test_a_member_commits_only_what_it_owns() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", 2)
    member = broker.groups.join("g", ["t"])
    mine = TopicPartition("t", 0)
    assert broker.groups.acquire("g", member, mine)
    await broker.append("t", None, [], b"x")
    await broker.commit_owned("g", member, {mine: 1})
    with pytest.raises(CommitFailed, match=r"no longer owns t\[1\]"):
        await broker.commit_owned("g", member, {TopicPartition("t", 1): 0})
    assert broker.committed("g", "t", 0) == 1
    assert broker.committed("g", "t", 1) is None


# -- what the faults do to running workers ----------------------------------------------------


async def test_a_failed_hand_off_leaves_the_job_unsettled_until_it_completes_once() -> None:
    runs, gate = Runs(), asyncio.Event()
    async with TestApp(gated_app(runs, gate), fast()) as t:
        receipt = await t.publish(Step(key="k", seq=1, fail_times=1), key="k")
        await runs.until(lambda: runs.started.total() == 1)
        t.broker.faults.fail_appends(2)  # the retry record's hand-off
        gate.set()
        assert await t.broker.wait_until(lambda: t.broker.faults.failed_appends == 2, 5)
        assert t.settlements(receipt.job_id) == [], "not settled while the hand-off fails"
        assert not t.broker.committed(t.settings.worker.group, TOPIC, receipt.partition or 0)
        await t.drain(timeout_s=10)

    outcomes = [(s.attempt, s.outcome) for s in t.settlements(receipt.job_id)]
    assert outcomes == [(1, Outcome.RETRYING), (2, Outcome.COMPLETED)]
    assert runs.started[receipt.job_id] == 2 and runs.finished[receipt.job_id] == 1
    assert sum(t.broker.end_offset(f"{TOPIC}.retry.1", p) for p in range(6)) == 1


async def test_a_dropped_connection_loses_nothing() -> None:
    runs, gate = Runs(), asyncio.Event()
    async with TestApp(gated_app(runs, gate), fast()) as t:
        receipts = [await t.publish(Step(key=f"k{n}", seq=n)) for n in range(20)]
        await runs.until(lambda: runs.started.total() == 20)

        t.broker.faults.disconnect()
        with pytest.raises(BrokerUnavailable, match="connection dropped"):
            await t.publish(Step(key="late", seq=99))
        gate.set()  # the jobs complete; their commits are refused
        assert await t.broker.wait_until(lambda: t.broker.faults.refused_commits >= 1, 5)
        assert len(t.settlements()) == 20
        group = t.settings.worker.group
        assert all(not t.broker.committed(group, TOPIC, p) for p in range(6))

        t.broker.faults.reconnect()
        receipts.append(await t.publish(Step(key="late", seq=99)))
        await t.drain(timeout_s=10)

    ids = {r.job_id for r in receipts}
    assert set(runs.finished) == ids
    assert set(runs.finished.values()) == {1}, "each job ran exactly once"
    assert {t.outcome(job_id) for job_id in ids} == {Outcome.COMPLETED}


async def test_slow_acks_slow_publishing_but_not_the_outcome() -> None:
    runs = Runs()
    async with TestApp(gated_app(runs, open_gate()), fast()) as t:
        t.broker.faults.delay_acks(0.2)
        wall = time.monotonic()
        receipt = await t.publish(Step(key="k", seq=1))
        assert time.monotonic() - wall >= 0.19
        await t.drain(timeout_s=5)
    assert t.outcome(receipt.job_id) is Outcome.COMPLETED


async def test_an_oversized_job_is_refused_at_publish() -> None:
    runs = Runs()
    async with TestApp(gated_app(runs, open_gate()), fast()) as t:
        t.broker.faults.limit_record_bytes(1000)
        with pytest.raises(RecordTooLarge):
            await t.publish(Step(key="k" * 2000, seq=1))
        small = await t.publish(Step(key="k", seq=2))
        await t.drain(timeout_s=5)
    assert list(runs.finished) == [small.job_id]


async def test_rebalances_mid_run_complete_every_job_once_in_key_order() -> None:
    runs = Runs()
    async with TestApp(gated_app(runs, open_gate()), fast(), workers=2) as t:
        group = t.settings.worker.group
        generation = t.broker.groups.generation(group)
        receipts = await publish_keyed(t, 600, keys=30)
        await runs.until(lambda: runs.finished.total() >= 100)
        t.broker.faults.rebalance(group)
        await runs.until(lambda: runs.finished.total() >= 200)
        await t.add_worker()  # a join: the group rebalances again
        await runs.until(lambda: runs.finished.total() >= 300)
        await t.stop_worker(0)  # a leave: and again
        await t.drain(timeout_s=30)
        assert t.broker.groups.generation(group) >= generation + 3
        assert committed_to_the_end(t, [TOPIC])

    ids = {r.job_id for r in receipts}
    assert set(runs.finished) == ids
    assert set(runs.finished.values()) == {1}, "every job completed once"
    assert in_key_order(runs.order)
    completed = [s.job_id for s in t.settlements() if s.outcome is Outcome.COMPLETED]
    assert collections.Counter(completed) == collections.Counter(ids)


async def test_redelivery_runs_nothing_twice_thanks_to_the_idempotency_store() -> None:
    runs, gate = Runs(), asyncio.Event()
    async with TestApp(gated_app(runs, gate), fast(), workers=2) as t:
        group = t.settings.worker.group
        receipts = [await t.publish(Step(key=f"k{n}", seq=n), key=f"k{n}") for n in range(10)]
        await runs.until(lambda: runs.started.total() == 10)
        t.broker.faults.disconnect()  # hold the commits back
        gate.set()
        assert await t.broker.wait_until(
            lambda: len(t.settlements()) == 10 and t.broker.faults.refused_commits > 0, 5
        )
        t.broker.faults.redeliver(group)
        t.broker.faults.reconnect()
        await t.drain(timeout_s=10)

    for receipt in receipts:
        outcomes = [s.outcome for s in t.settlements(receipt.job_id)]
        assert outcomes == [Outcome.COMPLETED, Outcome.DUPLICATE], receipt.job_id
    assert set(runs.finished.values()) == {1}


async def test_a_crashed_worker_loses_nothing_and_only_its_running_jobs_run_again() -> None:
    runs, gate = Runs(), asyncio.Event()
    victim_seq = 250
    async with TestApp(gated_app(runs, gate, gate_seq=victim_seq), fast(), workers=3) as t:
        receipts = await publish_keyed(t, 600, keys=30)
        victim = receipts[victim_seq]
        await runs.until(lambda: runs.started[victim.job_id] == 1)
        group = t.settings.worker.group
        owner = t.broker.groups.owner(group, TopicPartition(TOPIC, victim.partition or 0))
        members = [
            w.source.member if isinstance(w.source, MemorySource) else None for w in t.workers
        ]
        index = members.index(owner)
        running = {job_id for job_id in runs.started if not runs.finished[job_id]}

        await t.crash(index)
        assert owner not in t.broker.groups.members(group)
        gate.set()
        await t.drain(timeout_s=30)
        assert committed_to_the_end(t, [TOPIC])

    ids = {r.job_id for r in receipts}
    assert set(runs.finished) == ids
    assert set(runs.finished.values()) == {1}, "every job completed exactly once"
    ran_again = {job_id for job_id, count in runs.started.items() if count > 1}
    assert victim.job_id in ran_again, "cut off by the crash, run again by the new owner"
    assert ran_again <= running, "only jobs running at the crash run again"
    assert in_key_order(runs.order)


async def test_fail_appends_of_a_huge_count_costs_nothing_up_front() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    started = time.perf_counter()
    broker.faults.fail_appends(10**12)
    assert time.perf_counter() - started < 0.01
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            await broker.append("t", None, [], b"x")
    broker.faults.reset()
    record = await broker.append("t", None, [], b"x")
    assert (record.offset, broker.faults.failed_appends) == (0, 3)
