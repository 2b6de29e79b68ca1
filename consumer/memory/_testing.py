"""`TestApp`: run an app's handlers on real `Worker`s over an in-memory broker, in a test.

```python
async with TestApp(app, workers=3) as t:
    await t.publish(SendWelcomeEmail(user_id="42", ...), key="user-42")
    await t.drain()
    assert t.outcome(job_id) is Outcome.COMPLETED
```

Everything but the broker is the production code: the producer's wire encoding, the
worker's step chain, offset tracking, retry tier and dead-letter routing, consumer-group
rebalances. The workers share one idempotency store and one status store, as workers
sharing Redis would. `drain` waits for real progress (committed offsets reaching the ends
of every topic the workers read), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import ClassVar, NamedTuple, Self

from consumer.core import (
    App,
    DeadLetterFilter,
    DeadLetterRecord,
    Delivery,
    Outcome,
    Settings,
    main_destinations,
    store_connections,
)
from consumer.memory._backend import MemoryBackend
from consumer.memory._dead_letters import list_dead_letters
from consumer.memory._source import MemorySource
from consumer.runtime import Worker, normal_topics
from consumer.stores import IdempotencyStore, StatusStore, open_status, open_store
from consumer.telemetry import Telemetry
from producer import JobProducer, Priority, PublishRequest, Receipt
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import Job

__all__ = ["Settlement", "TestApp"]

_FAST = {
    "commit_interval_s": 0.02,
    "drain_timeout_s": 5.0,
    "revoke_timeout_s": 5.0,
    "broker_wait_s": 5.0,
}


class Settlement(NamedTuple):
    """One delivery a worker settled: which job and attempt, where it was read, how it
    ended. A run whose partition was revoked before it ended settles nothing (its
    redelivery does)."""

    job_id: str | None
    """The job id (None for a record without job attributes)."""
    attempt: int
    """1 for the first run, 2 for the first retry, ... (0 without attributes)."""
    outcome: Outcome
    topic: str
    """The main topic, or the retry tier topic the attempt was read from."""
    partition: int
    offset: int


@dataclass(slots=True)
class _Member:
    worker: Worker
    source: MemorySource
    task: asyncio.Task[None]


class TestApp:
    """`app`'s handlers on `workers` workers of one group, over a `MemoryBroker`."""

    __test__: ClassVar[bool] = False  # a harness, not a test class for pytest to collect

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        workers: int = 1,
        broker: MemoryBroker | None = None,
        telemetry: Telemetry | None = None,
        start_timeout_s: float = 5.0,
    ) -> None:
        """`settings` default to the documented defaults, without reading `JOBSTREAM_*`
        variables or a config file, so a test does not depend on the environment it runs in
        (pass `Settings()` to read them); worker timings they leave unset become a
        20 ms commit interval and 5 s drain, revoke and broker-wait timeouts, and the
        transport is always `memory`. `broker`: share one (default: a new one).
        `telemetry`: default what the application configured globally.
        `start_timeout_s`: how long entering (and `add_worker`) waits for the group to
        assign every partition."""
        settings = _for_tests(settings if settings is not None else Settings.model_construct())
        self.app = app
        self.settings = settings
        self.broker = broker if broker is not None else MemoryBroker()
        self.backend = MemoryBackend(self.broker, on_settle=self._settled)
        self._count = workers
        self._telemetry = telemetry if telemetry is not None else Telemetry.from_global()
        self._start_timeout_s = start_timeout_s
        retry = settings.retry
        levels = main_destinations(app, settings)
        mains = normal_topics(levels)
        tiers = [] if retry.in_place else [t for main in mains for t in retry.tier_topics(main)]
        self._read = [*levels, *tiers]
        self._dead = [retry.dead_letter_topic(main) for main in mains]
        self._members: list[_Member] = []
        self._settlements: list[Settlement] = []
        self._by_job: dict[str, list[Settlement]] = {}
        self._publisher = MemoryPublisher(self.broker, partitions=settings.routing.partitions)
        self.producer = JobProducer(settings, publisher=self._publisher, registry=app.registry)
        """Publishes into the broker with the real wire encoding."""
        self._store: IdempotencyStore | None = None
        self._status: StatusStore | None = None

    @property
    def status(self) -> StatusStore | None:
        """The status store the workers share (None with `status.backend = "none"`); an
        ingress built on it (`jobstream._ingress.create_app`) sees what they record."""
        return self._status

    @property
    def workers(self) -> list[Worker]:
        """Every worker started, in start order (stopped and crashed ones included)."""
        return [member.worker for member in self._members]

    async def __aenter__(self) -> Self:
        job_types = self.settings.worker.subscribe_types or self.app.job_types()
        await self.backend.provision(self.settings, job_types)
        self._store = await open_store(
            self.settings.idempotency, max_connections=store_connections(self.app, self.settings)
        )
        self._status = await open_status(self.settings)
        await self.producer.start()
        try:
            for _ in range(self._count):
                await self.add_worker()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        faults = await self._close()
        if faults and exc is None:
            raise faults[0]

    async def _close(self) -> list[BaseException]:
        """Stop every worker (drain, commit), then the producer and the stores; returns
        the workers' faults."""
        for member in self._members:
            member.worker.stop()
        results = await asyncio.gather(*(m.task for m in self._members), return_exceptions=True)
        await self.producer.stop()
        if self._store is not None:
            await self._store.close()
        if self._status is not None:
            await self._status.close()
        return [r for r in results if isinstance(r, Exception)]

    async def publish(
        self,
        job: Job,
        *,
        key: str | None = None,
        id: str | None = None,  # named after the CloudEvents attribute, shadowing is fine
        idempotency_key: str | None = None,
        not_before: datetime | None = None,
        delay: float | timedelta | None = None,
        priority: Priority = "normal",
    ) -> Receipt:
        """Publish `job` to its topic (`JobProducer.publish`; `priority` needs
        `routing.priorities`); the receipt names its partition and offset. Raises what the
        broker's faults inject."""
        return await self.producer.publish(
            job,
            key=key,
            id=id,
            idempotency_key=idempotency_key,
            not_before=not_before,
            delay=delay,
            priority=priority,
        )

    async def publish_many(self, jobs: Iterable[Job | PublishRequest]) -> list[Receipt]:
        """Publish many jobs in order (`JobProducer.publish_many`)."""
        return await self.producer.publish_many(jobs)

    async def add_worker(self) -> Worker:
        """Start one more worker; returns once the group assigned every partition. Raises
        the worker's fault if it fails to start."""
        tracer = self._telemetry.tracer("jobstream.worker") if self._telemetry.tracing else None
        async with contextlib.AsyncExitStack() as stack:  # the memory backend pushes nothing
            source, router = await self.backend.open(self.app, self.settings, stack, tracer)
        assert isinstance(source, MemorySource)
        worker = Worker(
            self.app,
            self.settings,
            source,
            router=router,
            store=self._store,
            status=self._status,
            telemetry=self._telemetry,
            producer=self.producer,
        )
        task = asyncio.create_task(worker.run(), name=f"jobstream-test-{len(self._members)}")
        task.add_done_callback(lambda _: self.broker.wake())
        self._members.append(_Member(worker, source, task))
        ready = await self.broker.wait_until(
            lambda: worker.ready or task.done(), self._start_timeout_s
        )
        self._raise_faults()
        if not ready:
            msg = f"timed out after {self._start_timeout_s:g}s waiting for the worker to start"
            raise TimeoutError(msg)
        await self.rebalanced()
        return worker

    async def rebalanced(self) -> None:
        """Wait until every live worker took its assignment (after a join, leave, crash or
        forced rebalance); `TimeoutError` after `start_timeout_s`."""
        group = self.settings.worker.group
        stable = self.broker.groups.stable
        if not await self.broker.wait_until(lambda: stable(group), self._start_timeout_s):
            msg = f"timed out after {self._start_timeout_s:g}s waiting for group {group!r}"
            raise TimeoutError(msg)

    async def stop_worker(self, index: int) -> None:
        """Stop worker `index` as SIGTERM does: drain, commit, leave the group."""
        member = self._members[index]
        member.worker.stop()
        await member.task

    async def crash(self, index: int) -> None:
        """Kill worker `index` as SIGKILL would: no drain, no commit; its running jobs are
        cut off unsettled and the group hands its partitions to the others, which read
        them from the committed offsets."""
        member = self._members[index]
        member.source.crash()
        member.worker.abandon()
        await member.task

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every record of the topics the workers read (main topics and retry
        tiers) is settled and committed, so every job has completed, failed for good
        (dead-lettered) or is a duplicate. Raises a worker's fault at once, and
        `TimeoutError` naming the partitions (and jobs) still pending after `timeout_s`."""

        def done() -> bool:
            stuck = not any(not m.task.done() for m in self._members)
            return stuck or any(_failed(m.task) for m in self._members) or not self._behind()

        if not await self.broker.wait_until(done, timeout_s):
            raise TimeoutError(self._pending(timeout_s))
        self._raise_faults()
        if self._behind():  # every worker stopped or crashed: nothing will settle the rest
            msg = (
                "drain: every worker has stopped or crashed, so nothing settles the rest; "
                f"start one with add_worker(); pending: {self._pending_records()}"
            )
            raise RuntimeError(msg)

    def settlements(self, job_id: str | None = None) -> list[Settlement]:
        """What the workers settled, in order: of `job_id`, or of every job."""
        if job_id is None:
            return list(self._settlements)
        return list(self._by_job.get(job_id, ()))

    def outcome(self, job_id: str) -> Outcome | None:
        """How the last settled attempt of `job_id` ended (None: nothing settled yet)."""
        settled = self._by_job.get(job_id)
        return settled[-1].outcome if settled else None

    def dead_letters(self, where: DeadLetterFilter | None = None) -> list[DeadLetterRecord]:
        """The records in the app's dead-letter topics (matching `where`), oldest first."""
        return list_dead_letters(self.broker, self._dead, where or DeadLetterFilter())

    # -- internals -----------------------------------------------------------------------

    def _settled(self, delivery: Delivery, outcome: Outcome) -> None:
        attributes = delivery.attributes
        job_id = attributes.id if attributes is not None else None
        attempt = attributes.attempt if attributes is not None else 0
        number = getattr(delivery.partition, "partition", 0)
        settled = Settlement(job_id, attempt, outcome, delivery.topic, number, delivery.offset)
        self._settlements.append(settled)
        if job_id is not None:
            self._by_job.setdefault(job_id, []).append(settled)

    def _raise_faults(self) -> None:
        for member in self._members:
            fault = member.task.exception() if _failed(member.task) else None
            if fault is not None:
                raise fault

    def _behind(self) -> list[tuple[str, int, int, int]]:
        """(topic, partition, committed, end) of every partition not committed to its end."""
        group, broker = self.settings.worker.group, self.broker
        behind = []
        for topic in self._read:
            for partition in range(broker.partitions(topic)):
                committed = broker.committed(group, topic, partition) or 0
                end = broker.end_offset(topic, partition)
                if committed < end:
                    behind.append((topic, partition, committed, end))
        return behind

    def _pending(self, timeout_s: float) -> str:
        group = self.settings.worker.group
        members = len(self.broker.groups.members(group))
        return (
            f"drain: not settled after {timeout_s:g}s ({members} live workers in group "
            f"{group!r}); pending: {self._pending_records()}"
        )

    def _pending_records(self) -> str:
        broker = self.broker
        lines = []
        for topic, partition, committed, end in self._behind()[:10]:
            headers = dict(broker.read(topic, partition, committed, 1)[0].headers)
            job = headers.get("ce_id", b"?").decode()
            due = headers.get("ce_jobnotbefore")
            when = f", not before {due.decode()}" if due else ""
            lines.append(f"{topic}[{partition}] committed {committed} of {end} (job {job}{when})")
        return "; ".join(lines)


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def _for_tests(settings: Settings) -> Settings:
    worker = settings.worker
    faster = {name: value for name, value in _FAST.items() if name not in worker.model_fields_set}
    return settings.model_copy(
        update={"transport": "memory", "worker": worker.model_copy(update=faster)}
    )
