"""The worker: fetch, dispatch under a concurrency bound and an ordering mode, settle.

Guarantees (SPEC G1-G4, G6, G8), and where each is kept:

- At most `max_in_flight` jobs are admitted (running, or waiting behind their lane); at the
  bound the source is paused, so a backlog does not grow memory (G4).
- Jobs of one lane (a key, a partition) run one at a time in fetch order (G3).
- A delivery is settled only when its run returned an outcome; the source's
  `OffsetTracker` commits nothing past an unsettled delivery (G2).
- On revoke, the admitted deliveries of the revoked partitions (running and queued) get
  `revoke_timeout_s` to finish; then the source commits and lets go. What is still queued
  after that is dropped unsettled, so the new owner reads it again.
- On stop, fetching stops, running jobs get `drain_timeout_s`, what is still running is
  cancelled (not settled: redelivered), the settled offsets are committed (G6).
- `abandon()` (the memory backend's simulated crash) stops as a killed process would: no
  drain and no commit, running jobs are cancelled unsettled.
- A handler's exception never reaches this module (the failure step settles it); any
  other exception is a worker fault: `run()` raises `WorkerError` (G8).

Telemetry (`Telemetry`, default: what the application configured globally) adds the
tracing step outermost and the metrics step right inside it, only when an SDK records
them: with telemetry off the pipeline is the same as without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

from consumer.core import (
    App,
    Delivery,
    FailureRouter,
    JobContext,
    JobRun,
    Outcome,
    Settings,
    Source,
    Step,
    WorkerError,
    compose,
)
from consumer.runtime._lanes import LaneScheduler, lane_for
from consumer.steps import (
    CancellationStep,
    FailureStep,
    HandlerStep,
    IdempotencyStep,
    RecordFailures,
    StatusStep,
    TimeoutStep,
    logging_step,
)
from consumer.stores import IdempotencyStore, StatusStore, open_store
from consumer.telemetry import ReportsBacklog, Telemetry, TracingStep, WorkerMetrics
from schemas import JobDecodeError, JobMessage, decode

log = logging.getLogger("jobstream.worker")
_FETCH_WAIT_S = 0.5


class Worker:
    """Runs `app`'s handlers for the jobs `source` delivers, until `stop()`."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        source: Source,
        *,
        store: IdempotencyStore | None = None,
        router: FailureRouter | None = None,
        status: StatusStore | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self._status = status
        self.source = source
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._store = store
        self._router = router or RecordFailures()
        self._lanes: LaneScheduler[Delivery] = LaneScheduler()
        self._tasks: dict[int, tuple[Delivery, asyncio.Task[None]]] = {}
        self._admitted = 0
        self._per_partition: dict[Hashable, int] = {}
        self._partition_drained = asyncio.Event()
        self._room = asyncio.Event()
        self._commit_due = asyncio.Event()
        self._stopping = asyncio.Event()
        self._abandoned = False
        self._fault: BaseException | None = None
        self._threads: Executor | None = None
        self._processes: Executor | None = None
        self.started = False
        self.counts: dict[str, int] = {}
        self.telemetry = telemetry if telemetry is not None else Telemetry.from_global()
        self.metrics: WorkerMetrics | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and self.source.ready and not self._stopping.is_set()

    @property
    def stopped_by_fault(self) -> bool:
        return self._fault is not None

    @property
    def in_flight(self) -> int:
        return self._admitted

    def stop(self) -> None:
        """Ask the worker to drain and stop (what SIGTERM does)."""
        self._stopping.set()

    def abandon(self) -> None:
        """Stop at once, as a killed process would (the memory backend's simulated crash):
        running jobs are cancelled unsettled, nothing more is committed, and the source is
        left as it is (neither committed nor stopped). `run()` returns soon after."""
        self._abandoned = True
        self._stopping.set()
        for _, task in list(self._tasks.values()):
            task.cancel()

    async def run(self) -> None:
        worker = self.settings.worker
        self._threads = ThreadPoolExecutor(worker.thread_pool_size, "jobstream-handler")
        if any(spec.cpu_bound for spec in self.app):
            self._processes = ProcessPoolExecutor(worker.process_pool_size or None)
        own_store = self._store is None
        store = self._store or await open_store(self.settings.idempotency)
        cancellation = (
            CancellationStep(self._status, self.settings.status.cancel_poll_s)
            if self._status is not None
            else None
        )
        self._pipeline = compose(
            [
                *self._telemetry_steps(),
                logging_step,
                IdempotencyStep(store, self.settings.idempotency, self.owner),
                *([StatusStep(self._status)] if self._status is not None else []),
                FailureStep(self._router, self.settings.retry),
                *([cancellation] if cancellation is not None else []),
                TimeoutStep(worker.job_timeout_s),
            ],
            HandlerStep(self._threads, self._processes),
        )
        await self.source.start(self._on_revoke)
        self.started = True
        fetcher = asyncio.create_task(self._fetch_loop(), name="jobstream-fetch")
        committer = asyncio.create_task(self._commit_loop(), name="jobstream-commit")
        backlog = None
        if self.metrics is not None and isinstance(self.source, ReportsBacklog):
            backlog = asyncio.create_task(self.metrics.refresh(self.source, self._stopping))
        try:
            await self._stopping.wait()
        finally:
            if backlog is not None:
                backlog.cancel()
            await self._shutdown(fetcher, committer)
            if cancellation is not None:
                await cancellation.close()
            if own_store:
                await store.close()
            self._threads.shutdown(wait=False, cancel_futures=True)
            if self._processes is not None:
                self._processes.shutdown(wait=False, cancel_futures=True)
        if self._fault is not None:
            raise WorkerError(f"worker stopped by a fault: {self._fault!r}") from self._fault

    def _telemetry_steps(self) -> list[Step]:
        """Tracing outermost (every other step and the handler run inside the job's span),
        then metrics; neither when no SDK records them."""
        steps: list[Step] = []
        telemetry, settings = self.telemetry, self.settings
        if telemetry.tracing:
            tracer = telemetry.tracer("jobstream.worker")
            tracing = TracingStep(
                tracer,
                system=settings.transport,
                group=settings.worker.group,
                attempt_parent=settings.telemetry.attempt_parent,
            )
            steps.append(tracing)
        if telemetry.metrics and self.metrics is None:
            self.metrics = WorkerMetrics(
                telemetry.meter("jobstream.worker"),
                system=settings.transport,
                group=settings.worker.group,
                retry=settings.retry,
            )
            self.metrics.observe(lambda: self._admitted)
        if self.metrics is not None:
            steps.append(self.metrics)
        return steps

    async def _shutdown(self, fetcher: asyncio.Task[None], committer: asyncio.Task[None]) -> None:
        fetcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await fetcher
        if self._abandoned:  # no drain, no commit: what was running is redelivered
            tasks = [committer, *(task for _, task in self._tasks.values())]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            return
        self.source.pause()
        running = [task for _, task in self._tasks.values()]
        if running:
            log.info(
                "draining %d running jobs (up to %.0fs)",
                len(running),
                self.settings.worker.drain_timeout_s,
            )
            _, late = await asyncio.wait(running, timeout=self.settings.worker.drain_timeout_s)
            for delivery, task in list(self._tasks.values()):
                if task in late:
                    log.warning(
                        "job cut off by the drain timeout, it will be redelivered: %s",
                        delivery.describe,
                    )
                    task.cancel()
            if late:
                await asyncio.wait(late)
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        try:
            await self.source.commit()
        finally:
            await self.source.stop()

    # -- fetching and dispatch ---------------------------------------------------------

    async def _fetch_loop(self) -> None:
        worker = self.settings.worker
        try:
            while not self._stopping.is_set():
                room = worker.max_in_flight - self._admitted
                if room <= 0:
                    # Keep polling while paused: the group must see us alive.
                    self.source.pause()
                    self._room.clear()
                    await self.source.fetch(0, 0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), _FETCH_WAIT_S)
                    continue
                self.source.resume()
                batch = await self.source.fetch(min(room, worker.fetch_max_records), _FETCH_WAIT_S)
                for delivery in batch:
                    self._admit(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("fetch loop failed")
            self._fault = error
            self._stopping.set()

    def _admit(self, delivery: Delivery) -> None:
        self._admitted += 1
        self._per_partition[delivery.partition] = self._per_partition.get(delivery.partition, 0) + 1
        lane = lane_for(self.settings.worker.ordering, delivery.partition, delivery.key)
        if self._lanes.submit(lane, delivery):
            self._start(delivery, lane)

    def _start(self, delivery: Delivery, lane: Hashable | None) -> None:
        task = asyncio.create_task(self._run_one(delivery, lane))
        self._tasks[id(delivery)] = (delivery, task)

    async def _run_one(self, delivery: Delivery, lane: Hashable | None) -> None:
        outcome: Outcome | None = None
        try:
            outcome = await self._pipeline(self._job_run(delivery))
            self.counts[outcome.value] = self.counts.get(outcome.value, 0) + 1
        except asyncio.CancelledError:
            pass  # cut off by shutdown or revoke: not settled, redelivered
        except Exception as error:
            log.exception("runtime fault while processing %s", delivery.describe)
            self._fault = error
            self._stopping.set()
        finally:
            self._tasks.pop(id(delivery), None)
            if outcome is not None and self.source.owns(delivery):
                self.source.settle(delivery, outcome)
                if self.source.pending_commits() >= self.settings.worker.commit_every:
                    self._commit_due.set()
            self._finish(delivery, lane)

    def _finish(self, delivery: Delivery, lane: Hashable | None) -> None:
        self._release(delivery)
        following = self._lanes.done(lane, delivery)
        while following is not None and self._stopping.is_set():
            # Stopping: what waited behind this lane is left unsettled (redelivered).
            self._release(following)
            following = self._lanes.done(lane, following)
        if following is not None:
            self._start(following, lane)

    def _release(self, delivery: Delivery) -> None:
        self._admitted -= 1
        left = self._per_partition.get(delivery.partition, 1) - 1
        if left:
            self._per_partition[delivery.partition] = left
        else:
            self._per_partition.pop(delivery.partition, None)
            self._partition_drained.set()
        self._room.set()

    def _job_run(self, delivery: Delivery) -> JobRun:
        attributes = delivery.attributes
        if attributes is None:
            error = delivery.error or JobDecodeError("record has no job attributes")
            return JobRun(delivery, None, None, None, decode_error=error)
        try:
            decoded = decode(JobMessage(attributes, delivery.body), self.app.registry)
        except JobDecodeError as error:
            return JobRun(delivery, None, None, None, decode_error=error)
        spec = self.app.spec_for(attributes.type, attributes.version)
        timeout_s = spec.timeout_s or self.settings.worker.job_timeout_s
        context = JobContext(
            attributes=attributes,
            logger=logging.LoggerAdapter(
                logging.getLogger("jobstream.handler"),
                {
                    "job": {
                        "job_id": attributes.id,
                        "job_type": attributes.type,
                        "attempt": attributes.attempt,
                    }
                },
            ),
            deadline=time.monotonic() + timeout_s,
        )
        return JobRun(delivery, decoded.job, spec, context)

    # -- commits and rebalances ----------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self.settings.worker.commit_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_due.wait(), interval)
            self._commit_due.clear()
            try:
                await self.source.commit()
            except Exception as error:  # noqa: BLE001 - retried next interval
                log.warning("commit failed, will retry: %s", error)

    async def _on_revoke(self, partitions: Sequence[Hashable]) -> None:
        revoked = set(partitions)
        deadline = time.monotonic() + self.settings.worker.revoke_timeout_s
        while any(p in self._per_partition for p in revoked):
            self._partition_drained.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._partition_drained.wait(), remaining)
        for delivery in self._lanes.drop(lambda d: d.partition in revoked):
            self._release(delivery)
        late = sum(self._per_partition.get(p, 0) for p in revoked)
        if late:
            log.warning("%d jobs of revoked partitions still running: not committed", late)
