"""The real `Worker` on the memory backend (`consumer.memory.TestApp`): exact counts and
identities for ordering, retries through the tier topics, dead letters and replay, and
the backend's own surface (features, provisioning, exports)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from typing import Any

import pytest

from consumer import App, DeadLetter, JobContext, Retry, WorkerError, backend_for, open_worker
from consumer.core import DeadLetterFilter, Outcome, Settings
from consumer.memory import BACKEND, MemoryBackend, Settlement, TestApp
from producer import JobProducer, ProducerSettings, PublishRequest
from producer.memory import BROKER, MemoryBroker
from schemas import Job

TOPIC = "jobs.test.memory.step"


class Step(Job, type="test.memory.step", version=1):
    key: str
    seq: int
    fail_times: int = 0
    """Raise on the first `fail_times` attempts."""
    permanent: bool = False


def fast(**changes: Any) -> Settings:
    """Fast retries: 50 ms, then 200 ms; tiers of 50 ms, 200 ms and 1 s."""
    values: dict[str, Any] = {
        "transport": "memory",
        "worker": {"commit_interval_s": 0.02},
        "retry": {
            "policy": {"max_attempts": 3, "initial_delay_s": 0.05, "multiplier": 4, "jitter": 0},
            "tiers_s": [0.05, 0.2, 1.0],
        },
        **changes,
    }
    return Settings.model_validate(values)


class Recorder:
    """An app whose handler records every run: (key, seq, job id, attempt)."""

    def __init__(self) -> None:
        self.app = App("memory-test")
        self.runs: list[tuple[str, int, str, int]] = []
        self.app.handler(Step)(self.handle)

    async def handle(self, job: Step, ctx: JobContext) -> None:
        self.runs.append((job.key, job.seq, ctx.job_id, ctx.attempt))
        await asyncio.sleep(0)  # let other jobs interleave
        if job.permanent:
            raise DeadLetter("this job can never succeed")
        if ctx.attempt <= job.fail_times:
            raise RuntimeError(f"attempt {ctx.attempt} fails")


async def test_2000_jobs_over_3_workers_complete_once_each_in_key_order() -> None:
    recorder = Recorder()
    keys = [f"user-{n}" for n in range(50)]
    async with TestApp(recorder.app, fast(), workers=3) as t:
        jobs = [
            PublishRequest(Step(key=keys[n % 50], seq=n), key=keys[n % 50]) for n in range(2000)
        ]
        await t.publish_many(jobs)
        await t.drain(timeout_s=30)
        counts = [w.counts.get("completed", 0) for w in t.workers]

    assert len(recorder.runs) == 2000
    assert (
        collections.Counter(job_id for _, _, job_id, _ in recorder.runs).most_common(1)[0][1] == 1
    )
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for key, seq, _, _ in recorder.runs:
        by_key[key].append(seq)
    assert by_key == {key: list(range(n, 2000, 50)) for n, key in enumerate(keys)}
    assert sum(counts) == 2000
    assert all(count > 0 for count in counts), f"every worker took part: {counts}"
    assert {s.outcome for s in t.settlements()} == {Outcome.COMPLETED}


async def test_a_job_that_fails_twice_succeeds_on_attempt_3_through_the_tiers() -> None:
    recorder = Recorder()
    async with TestApp(recorder.app, fast()) as t:
        receipt = await t.publish(Step(key="k", seq=1, fail_times=2), key="k")
        await t.drain(timeout_s=5)

    job = receipt.job_id
    assert [
        (attempt, outcome, topic) for _, attempt, outcome, topic, _, _ in t.settlements(job)
    ] == [
        (1, Outcome.RETRYING, TOPIC),
        (2, Outcome.RETRYING, f"{TOPIC}.retry.1"),  # after 50 ms: the 50 ms tier
        (3, Outcome.COMPLETED, f"{TOPIC}.retry.2"),  # after 200 ms: the 200 ms tier
    ]
    assert [attempt for *_, attempt in recorder.runs] == [1, 2, 3]
    assert t.outcome(job) is Outcome.COMPLETED
    assert t.dead_letters() == []


async def test_a_permanent_failure_is_dead_lettered_with_its_reason_and_replayed_once() -> None:
    recorder = Recorder()
    async with TestApp(recorder.app, fast()) as t:
        doomed = await t.publish(Step(key="k", seq=1, permanent=True), key="k")
        exhausted = await t.publish(Step(key="j", seq=2, fail_times=9), key="j")
        await t.drain(timeout_s=5)

        assert t.outcome(doomed.job_id) is Outcome.DEAD_LETTERED
        assert t.outcome(exhausted.job_id) is Outcome.DEAD_LETTERED
        letters = {letter.job_id: letter for letter in t.dead_letters()}
        assert letters.keys() == {doomed.job_id, exhausted.job_id}
        assert letters[doomed.job_id].reason == "dead-letter-requested"
        assert letters[doomed.job_id].ext("joberror") == "this job can never succeed"
        assert letters[doomed.job_id].header("ce_jobreason") == "dead-letter-requested"
        assert letters[exhausted.job_id].reason == "retries-exhausted"
        assert letters[exhausted.job_id].ext("jobattempt") == "3"
        assert letters[doomed.job_id].key == b"k", "the original key"
        assert all(letter.topic == f"{TOPIC}.dlq" for letter in letters.values())

        found = await t.backend.find_dead_letters(
            t.settings, [f"{TOPIC}.dlq"], DeadLetterFilter(reason="retries-exhausted")
        )
        assert [letter.job_id for letter in found] == [exhausted.job_id]
        first = await t.backend.replay(t.settings, found, rate_per_s=1000)
        again = await t.backend.replay(t.settings, found, rate_per_s=1000)
        assert [(r.status, r.destination) for r in first] == [("replayed", TOPIC)]
        assert [r.status for r in again] == ["already-replayed"]
        await t.drain(timeout_s=5)

    replayed = [s for s in t.settlements(exhausted.job_id) if s.topic == TOPIC and s.attempt == 1]
    assert len(replayed) == 2, "the original first attempt and the replay's"
    assert sum(1 for *_, job_id, _ in recorder.runs if job_id == exhausted.job_id) == 6


async def test_an_undecodable_record_is_dead_lettered() -> None:
    recorder = Recorder()
    async with TestApp(recorder.app, fast()) as t:
        await t.broker.append(TOPIC, b"k", [("ce_type", b"test.memory.step")], b"{}")
        await t.drain(timeout_s=5)
        [letter] = t.dead_letters()
    assert letter.reason == "invalid-attributes"
    assert [s.outcome for s in t.settlements()] == [Outcome.DEAD_LETTERED]
    assert recorder.runs == []


async def test_drain_names_what_is_still_pending() -> None:
    app = App("stuck")
    gate = asyncio.Event()

    @app.handler(Step)
    async def stuck(job: Step, ctx: JobContext) -> None:
        await gate.wait()

    async with TestApp(app, fast()) as t:
        receipt = await t.publish(Step(key="k", seq=1), key="k")
        with pytest.raises(
            TimeoutError, match=rf"{TOPIC}\[\d\] committed 0 of 1 \(job {receipt.job_id}\)"
        ):
            await t.drain(timeout_s=0.2)
        gate.set()
        await t.drain(timeout_s=5)
    assert t.outcome(receipt.job_id) is Outcome.COMPLETED


async def test_a_retry_requested_by_the_handler_waits_its_delay() -> None:
    app = App("retry")
    attempts: list[int] = []

    @app.handler(Step)
    async def once_more(job: Step, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry(delay_s=0.15)

    async with TestApp(app, fast()) as t:
        receipt = await t.publish(Step(key="k", seq=1))
        await t.drain(timeout_s=5)
    assert attempts == [1, 2]
    [first, second] = t.settlements(receipt.job_id)
    assert isinstance(first, Settlement) and second.topic == f"{TOPIC}.retry.2"


def test_the_harness_makes_unset_worker_timings_fast_and_keeps_the_rest() -> None:
    mine = Settings.model_validate(
        {"transport": "kafka", "worker": {"commit_interval_s": 3, "group": "mine"}}
    )
    settings = TestApp(Recorder().app, mine).settings
    assert settings.transport == "memory"
    assert (settings.worker.commit_interval_s, settings.worker.group) == (3, "mine")
    assert settings.worker.drain_timeout_s == 5.0
    assert TestApp(Recorder().app).settings.worker.commit_interval_s == 0.02


def test_the_backend_is_selected_by_its_transport_name() -> None:
    assert backend_for("memory") is BACKEND
    assert isinstance(BACKEND.broker, MemoryBroker)
    features = BACKEND.features
    assert (features.name, features.separate_processes, features.retries, features.key_order) == (
        "memory",
        False,
        "records",
        "always",
    )


async def test_provisioning_creates_main_tier_and_dead_letter_topics() -> None:
    backend = MemoryBackend()
    settings = fast()
    lines = await backend.provision(settings, ["test.memory.step"])
    assert lines == [
        f"memory topic {TOPIC}: created",
        f"memory topic {TOPIC}.retry.1: created",
        f"memory topic {TOPIC}.retry.2: created",
        f"memory topic {TOPIC}.retry.3: created",
        f"memory topic {TOPIC}.dlq: created",
        "memory topic jobstream.dlq-replays: ready",
    ]
    assert (await backend.provision(settings, ["test.memory.step"]))[0].endswith("exists")
    assert backend.broker.partitions(TOPIC) == settings.routing.partitions
    assert backend.dead_letter_destinations(settings, ["test.memory.step"]) == [f"{TOPIC}.dlq"]
    with pytest.raises(ValueError, match="no idempotency store"):
        await backend.open_idempotency_store(settings)


async def test_a_worker_that_cannot_start_fails_the_harness_with_its_error() -> None:
    t = TestApp(Recorder().app, fast(worker={"broker_wait_s": 0.05}))
    t.broker.faults.disconnect()
    with pytest.raises(WorkerError, match="stayed disconnected"):
        async with t:
            pass


def test_pytest_does_not_collect_the_harness() -> None:
    assert TestApp.__test__ is False


async def test_a_producer_and_a_worker_on_transport_memory_share_the_process_broker() -> None:
    """`transport = "memory"` picks one broker for the producer and the worker backend,
    so a job published with `JobProducer` is consumed by `open_worker` in the same process."""

    class Ping(Job, type="test.memory.shared", version=1, register=False):
        n: int

    seen: list[int] = []
    shared = App("shared")

    @shared.handler(Ping)
    async def handle(job: Ping, ctx: JobContext) -> None:
        seen.append(job.n)

    topic = f"shared-{uuid.uuid4().hex[:8]}"
    routing = {"routes": {"test.memory.shared": topic}}
    settings = Settings.model_validate(
        {
            "transport": "memory",
            "create_missing": True,
            "routing": routing,
            "worker": {"group": topic, "commit_interval_s": 0.02},
        }
    )
    assert BACKEND.broker is BROKER
    async with JobProducer(
        ProducerSettings.model_validate(
            {"transport": "memory", "create_missing": True, "routing": routing}
        ),
        registry=shared.registry,
    ) as producer:
        receipts = [await producer.publish(Ping(n=n)) for n in range(5)]
    assert {r.destination for r in receipts} == {topic}
    async with open_worker(shared, settings) as worker:
        task = asyncio.create_task(worker.run())
        assert await BROKER.wait_until(lambda: len(seen) == 5, 10)
        worker.stop()
        await task
    assert sorted(seen) == [0, 1, 2, 3, 4]


async def test_the_default_settings_of_the_harness_ignore_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A test's outcome must not depend on the shell it runs in: with no `settings`, the
    harness reads no `JOBSTREAM_*` variable (a 30 s commit interval would stall drain)."""
    monkeypatch.setenv("JOBSTREAM_WORKER__COMMIT_INTERVAL_S", "30")
    monkeypatch.setenv("JOBSTREAM_WORKER__ORDERING", "none")
    recorder = Recorder()
    async with TestApp(recorder.app) as t:
        assert (t.settings.worker.commit_interval_s, t.settings.worker.ordering) == (0.02, "key")
        receipt = await t.publish(Step(key="k", seq=1), key="k")
        await t.drain(timeout_s=2)
    assert t.outcome(receipt.job_id) is Outcome.COMPLETED


async def test_drain_with_every_worker_gone_fails_at_once_and_says_why() -> None:
    recorder = Recorder()
    async with TestApp(recorder.app, fast()) as t:
        await t.stop_worker(0)
        await t.publish(Step(key="k", seq=1), key="k")
        started = asyncio.get_running_loop().time()
        with pytest.raises(RuntimeError, match=r"every worker has stopped.*committed 0 of 1"):
            await t.drain(timeout_s=30)
        assert asyncio.get_running_loop().time() - started < 1
