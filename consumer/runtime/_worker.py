"""The worker: fetch, dispatch under a concurrency bound and an ordering mode, settle.

Guarantees (SPEC G1-G4, G6, G8), and where each is kept:

- At most `max_in_flight` jobs are admitted (running, or waiting behind their lane); at the
  bound the source is paused, so a backlog does not grow memory (G4).
- Jobs of one lane (a key, a partition) run one at a time in fetch order (G3).
- A delivery is settled only when its run returned an outcome; the source's
  `OffsetTracker` commits nothing past an unsettled delivery (G2).
- On revoke, the admitted deliveries of the revoked partitions (running and queued) get
  `revoke_timeout_s` to finish; then what is still queued is dropped and what still runs
  is cut off, both unsettled, so the new owner reads them again; then the source commits
  and lets go.
- On stop, fetching stops, running jobs get `drain_timeout_s`, what is still running is
  cut off (not settled: redelivered), the settled offsets are committed (G6).
- A cut-off is the runtime's own record (`JobRun.cut_off`, set before the job's task is
  cancelled): a cut-off run is never settled, whatever its handler returned. Every wait
  after a cut-off is bounded (`cancel_grace_s`, plus a second for the outer steps);
  what still runs then is abandoned, logged with its job, and listed in `abandoned`.
- `abandon()` (the memory backend's simulated crash) stops as a killed process would: no
  drain and no commit, running jobs are cut off unsettled.
- With cron schedules (`app.schedules`) and a `producer`, a `CronScheduler` publishes
  their ticks while this replica leads (`_cron.py`); it stops first at shutdown and
  gives the lead up, except when the worker is abandoned.
- A handler's exception never reaches this module (the failure step settles it); any
  other exception is a worker fault: `run()` raises `WorkerError` (G8).

Telemetry (`Telemetry`, default: what the application configured globally) adds the
tracing step outermost and the metrics step right inside it, only when an SDK records
them: with telemetry off the pipeline is the same as without it. What `/livez` and
`/readyz` say beyond the worker's own state (the fetch loop's turns, the broker's
answers), and the jobs that overrun their timeout, is kept by `_progress.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from consumer.core import (
    App,
    Deferrals,
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
    store_connections,
)
from consumer.runtime._cron import CronScheduler, TickPublisher
from consumer.runtime._cut_offs import CutOffs, Running
from consumer.runtime._lanes import LaneScheduler, lane_for
from consumer.runtime._progress import Overruns, Progress
from consumer.runtime._report import report_worker
from consumer.runtime._scheduled import record_scheduled
from consumer.steps import (
    AbandonedRun,
    CancellationStep,
    FailureStep,
    HandlerStep,
    IdempotencyStep,
    RecordFailures,
    StatusStep,
    TimeoutStep,
    TransactionalStore,
    TransactionStep,
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
        producer: TickPublisher | None = None,
    ) -> None:
        """`producer` publishes the ticks of `app`'s cron schedules (without one they
        are not published, with a warning)."""
        self.app = app
        self.settings = settings
        self._status = status
        self.source = source
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._store = store
        self._router = router or RecordFailures()
        self._lanes: LaneScheduler[Delivery] = LaneScheduler()
        self._tasks: dict[int, Running] = {}
        self._admitted = 0
        self._per_partition: dict[Hashable, int] = {}
        self._partition_drained = asyncio.Event()
        self._room = asyncio.Event()
        self._commit_due = asyncio.Event()
        self._stopping = asyncio.Event()
        self._abandoned = False
        self._fault: BaseException | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._handler: HandlerStep | None = None
        self._progress = Progress(settings, source)
        self._cut_offs = CutOffs()
        self._claims_lost: set[asyncio.Task[None]] = set()  # their cut-offs, reported
        self._overruns = Overruns(settings.worker.cancel_grace_s)
        self.started = False
        self.counts: dict[str, int] = {}
        self.telemetry = telemetry if telemetry is not None else Telemetry.from_global()
        self.metrics: WorkerMetrics | None = None
        self._producer = producer
        self.cron: CronScheduler | None = None
        """The app's cron scheduler on this worker (None without schedules)."""

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.not_ready() is None

    def not_ready(self) -> str | None:
        """Why `/readyz` answers 503 now, or None: not joined to the group yet, stopping,
        or the broker silent for longer than `health.readiness_silence_s`."""
        if self._stopping.is_set():
            return "stopping"
        if not (self.started and self.source.ready):
            return "not joined to the group yet"
        return self._progress.not_ready()

    def not_live(self) -> str | None:
        """Why `/livez` answers 503 now, or None: stopped by a fault, or no progress (a turn
        of the fetch loop, an answer of the broker) for `health.liveness_silence_s`."""
        if self._fault is not None:
            return f"stopped by a fault: {self._fault!r}"
        return self._progress.not_live(turning=self.started and not self._stopping.is_set())

    @property
    def stopped_by_fault(self) -> bool:
        return self._fault is not None

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def abandoned(self) -> list[AbandonedRun]:
        """Runs the worker cut off and stopped waiting for that still run: handlers that
        did not stop within `cancel_grace_s` (an async one that swallows cancellation, a
        blocked thread, a pool process), and jobs stuck in a step after the cut-off. None
        of them is settled; after `run()` a process should exit without waiting for them
        (`jobstream worker` does)."""
        found = list(self._handler.abandoned.values()) if self._handler is not None else []
        return found + list(self._cut_offs.stuck.values())

    @property
    def overruns(self) -> list[str]:
        """Jobs still running `cancel_grace_s` past their timeout (`topic[partition]@offset`):
        an async handler that swallows its timeout's cancellation. Never settled, so their
        offsets are not committed; reported once each in the log."""
        return self._overruns.described

    def stop(self) -> None:
        """Ask the worker to drain and stop (what SIGTERM does)."""
        self._stopping.set()

    def abandon(self) -> None:
        """Stop at once, as a killed process would (the memory backend's simulated crash):
        running jobs are cancelled unsettled, nothing more is committed, and the source is
        left as it is (neither committed nor stopped). `run()` returns soon after."""
        self._abandoned = True
        self._stopping.set()
        self._cut_offs.cut_off(self._tasks.values(), "worker abandoned", self._handler)

    async def run(self) -> None:
        worker = self.settings.worker
        self._loop = asyncio.get_running_loop()
        self._threads = ThreadPoolExecutor(worker.thread_pool_size, "jobstream-handler")
        processes = None
        if any(spec.cpu_bound for spec in self.app):
            processes = functools.partial(ProcessPoolExecutor, worker.process_pool_size or None)
        self._handler = HandlerStep(self._threads, processes, worker.cancel_grace_s)
        own_store = self._store is None
        store = self._store or await open_store(
            self.settings.idempotency, max_connections=store_connections(self.app, self.settings)
        )
        transaction = await self._transaction_steps(store, own_store=own_store)
        cancellation = (
            CancellationStep(self._status, self.settings.status.cancel_poll_s)
            if self._status is not None
            else None
        )
        self._pipeline = compose(
            [
                *self._telemetry_steps(),
                logging_step,
                IdempotencyStep(
                    store, self.settings.idempotency, self.owner, cut_off=self._claim_lost
                ),
                *([StatusStep(self._status, self.owner)] if self._status is not None else []),
                FailureStep(self._router, self.settings.retry),
                *([cancellation] if cancellation is not None else []),
                TimeoutStep(worker.job_timeout_s),
                *transaction,
            ],
            self._handler,
        )
        self.cron = self._cron_scheduler(store)
        await self.source.start(self._on_revoke)
        self.started = True
        cron = None
        if self.cron is not None:
            cron = asyncio.create_task(self.cron.run(self._stopping), name="jobstream-cron")
        fetcher = asyncio.create_task(self._fetch_loop(), name="jobstream-fetch")
        committer = asyncio.create_task(self._commit_loop(), name="jobstream-commit")
        watcher = asyncio.create_task(self._watch_loop(), name="jobstream-health")
        background = []
        if self.metrics is not None and isinstance(self.source, ReportsBacklog):
            background.append(
                asyncio.create_task(self.metrics.refresh(self.source, self._stopping))
            )
        if self._status is not None:
            identity = (self.owner, worker.group, self.settings.transport)
            background.append(
                asyncio.create_task(
                    report_worker(
                        self._status,
                        identity,
                        self.source,
                        lambda: self._admitted,
                        self.settings.retry,
                        self._stopping,
                    )
                )
            )
        deferrals = getattr(self.source, "deferrals", None)
        if self._status is not None and isinstance(deferrals, Deferrals):
            background.append(
                asyncio.create_task(record_scheduled(deferrals, self._status, self._stopping))
            )
        try:
            await self._stopping.wait()
        finally:
            for task in background:
                task.cancel()
            await _stop_task(watcher, worker.cancel_grace_s)
            if cron is not None:
                await self._stop_cron(cron)
            await self._shutdown(fetcher, committer)
            if cancellation is not None:
                await cancellation.close()
            if own_store:
                await store.close()
            self._let_go_of_pools()
        if self._fault is not None:
            raise WorkerError(f"worker stopped by a fault: {self._fault!r}") from self._fault

    async def _transaction_steps(self, store: IdempotencyStore, *, own_store: bool) -> list[Step]:
        """The transaction step when the app has transactional handlers (none otherwise:
        the chain stays as short as before); `WorkerError` with one line when the store
        cannot write a completion inside a transaction."""
        if not any(spec.transactional for spec in self.app):
            return []
        if not isinstance(store, TransactionalStore):
            if own_store:
                await store.close()
            self._let_go_of_pools()
            problem = transactional_problem(self.app, self.settings.idempotency.backend)
            raise WorkerError(
                problem
                or f"transactional handlers need an idempotency store that can complete a job"
                f" inside a transaction (the postgres store), not {type(store).__name__}"
            )
        return [TransactionStep(store, self.settings.idempotency.retention_s)]

    def _cron_scheduler(self, store: IdempotencyStore) -> CronScheduler | None:
        schedules = self.app.schedules
        if not schedules:
            return None
        if self._producer is None:
            log.warning(
                "cron: %d schedules not published: this worker was built without a producer",
                len(schedules),
            )
            return None
        if self.settings.idempotency.backend == "memory":
            log.info(
                "cron: the lead is held in this process's memory store: with more than one "
                "replica, use a shared idempotency store (redis, postgres, nats-kv)"
            )
        return CronScheduler(
            self.app.name,
            schedules,
            store,
            self._producer,
            self.settings.cron,
            self.owner,
            retention_s=self.settings.idempotency.retention_s,
            per_process=self.settings.idempotency.backend == "memory",
        )

    async def _stop_cron(self, cron: asyncio.Task[None]) -> None:
        """Stop publishing ticks; give the lead up unless abandoned (a killed process
        gives nothing up: its lease lapses)."""
        grace = self.settings.worker.cancel_grace_s
        await _stop_task(cron, grace)
        if self.cron is None or self._abandoned:
            return
        try:
            async with asyncio.timeout(grace):
                await self.cron.resign()
        except Exception as error:  # noqa: BLE001 - the lease then lapses by itself
            log.warning("cron: could not give the lead up: %r", error)

    def _let_go_of_pools(self) -> None:
        """Shut the pools down without waiting. A pool process still running an abandoned
        call is terminated (nothing of it is settled); a thread cannot be: it is reported,
        and the process exits without it."""
        abandoned = self.abandoned
        if abandoned:
            log.error(
                "stopping with %d abandoned jobs still running (not settled, redelivered): %s",
                len(abandoned),
                ", ".join(f"{a.job_id} ({a.delivery}, {a.where})" for a in abandoned),
            )
        assert self._threads is not None
        self._threads.shutdown(wait=False, cancel_futures=True)
        processes = self._handler.processes if self._handler is not None else None
        if isinstance(processes, ProcessPoolExecutor):
            processes.shutdown(wait=False, cancel_futures=True)
            if any(a.where == "process" for a in abandoned):
                # `_processes`: no public way to stop a busy pool before Python 3.14.
                for process in list((processes._processes or {}).values()):
                    process.terminate()

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
                job_types=self.app.job_types(),
            )
            self.metrics.observe(lambda: self._admitted)
        if self.metrics is not None:
            steps.append(self.metrics)
        return steps

    async def _shutdown(self, fetcher: asyncio.Task[None], committer: asyncio.Task[None]) -> None:
        grace = self.settings.worker.cancel_grace_s
        await _stop_task(fetcher, grace)
        if self._abandoned:  # no drain, no commit: what was running is redelivered
            await _stop_task(committer, grace)
            await self._cut_offs.ended(self._tasks.values(), self.settings.worker.cancel_grace_s)
            return
        self.source.pause()
        running = [entry.task for entry in self._tasks.values() if entry.task is not None]
        if running:
            log.info(
                "draining %d running jobs (up to %.0fs)",
                len(running),
                self.settings.worker.drain_timeout_s,
            )
            await asyncio.wait(running, timeout=self.settings.worker.drain_timeout_s)
            late = list(self._tasks.values())
            self._cut_offs.cut_off(late, "drain timeout", self._handler)
            await self._cut_offs.ended(late, self.settings.worker.cancel_grace_s)
        await _stop_task(committer, grace)
        try:
            await self.source.commit()
        finally:
            await self.source.stop()

    # -- fetching and dispatch ---------------------------------------------------------

    async def _fetch_loop(self) -> None:
        worker = self.settings.worker
        try:
            while not self._stopping.is_set():
                self._progress.turn()
                room = worker.max_in_flight - self._admitted
                if room <= 0:
                    # Keep polling while paused: the group must see us alive.
                    self.source.pause()
                    self._room.clear()
                    await self.source.fetch(0, 0)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_FETCH_WAIT_S):
                            await self._room.wait()
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
        entry = Running(delivery, self._job_run(delivery))
        self._tasks[id(delivery)] = entry
        entry.task = entry.run.task = self._loop.create_task(self._run_one(entry, lane))

    async def _run_one(self, entry: Running, lane: Hashable | None) -> None:
        delivery, run = entry.delivery, entry.run
        outcome: Outcome | None = None
        try:
            outcome = await self._pipeline(run)
        except asyncio.CancelledError:
            pass  # cut off by shutdown or revoke: not settled, redelivered
        except BaseException as error:
            # Any other escape is a runtime fault (a handler's own BaseException is its
            # job's failure, turned into one by the failure step).
            log.exception("runtime fault while processing %s", delivery.describe)
            self._fault = error
            self._stopping.set()
        finally:
            self._tasks.pop(id(delivery), None)
            if run.cut_off is not None:
                outcome = None  # the runtime's record, not the handler's return, decides
            if outcome is not None:
                self.counts[outcome.value] = self.counts.get(outcome.value, 0) + 1
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
        context = JobContext(attributes, None, time.monotonic() + timeout_s)
        return JobRun(delivery, decoded.job, spec, context)

    # -- commits and rebalances ----------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self.settings.worker.commit_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._commit_due.wait()
            self._commit_due.clear()
            self._overruns.find(self._tasks.values())
            try:
                await self.source.commit()
            except Exception as error:  # noqa: BLE001 - retried next interval
                log.warning("commit failed, will retry: %s", error)

    async def _watch_loop(self) -> None:
        try:
            await self._progress.watch()
        except WorkerError as error:  # e.g. a lost consumer that cannot be re-created
            self._fault = error
            self._stopping.set()

    def _claim_lost(self, run: JobRun, reason: str) -> None:
        """The idempotency step found `run`'s claim lost (taken over, or not renewable for
        a whole lease): cut it off as a revoke would, never settled (issue 13, K4)."""
        late = [entry for entry in self._tasks.values() if entry.run is run]
        self._cut_offs.cut_off(late, reason, self._handler)
        if late:
            ended = asyncio.create_task(
                self._cut_offs.ended(late, self.settings.worker.cancel_grace_s)
            )
            self._claims_lost.add(ended)
            ended.add_done_callback(self._claims_lost.discard)

    async def _on_revoke(self, partitions: Sequence[Hashable]) -> None:
        revoked = set(partitions)
        deadline = time.monotonic() + self.settings.worker.revoke_timeout_s
        while any(p in self._per_partition for p in revoked):
            self._partition_drained.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._partition_drained.wait()
        # Queued ones first, so that a cut-off run that ends does not start the next.
        for delivery in self._lanes.drop(lambda d: d.partition in revoked):
            self._release(delivery)
        late = [entry for entry in self._tasks.values() if entry.delivery.partition in revoked]
        if late:
            self._cut_offs.cut_off(late, "revoke timeout", self._handler)
            await self._cut_offs.ended(late, self.settings.worker.cancel_grace_s)


def transactional_problem(app: App, backend: str) -> str | None:
    """Why `app` cannot run with the idempotency store `backend` (one line), or None:
    transactional handlers need the postgres store (docs/outbox.md)."""
    transactional = [spec.name for spec in app if spec.transactional]
    if not transactional or backend == "postgres":
        return None
    return (
        f"transactional handlers ({', '.join(transactional)}) need the postgres "
        f"idempotency store, not {backend!r}: set JOBSTREAM_IDEMPOTENCY__BACKEND=postgres "
        "and JOBSTREAM_IDEMPOTENCY__URL to the database the handlers write to"
    )


async def _stop_task(task: asyncio.Task[None], grace_s: float) -> None:
    """Cancel one of the worker's own loops and wait for it, `grace_s` at most: a wait
    after a cancel is bounded (a loop that lost its cancellation is left behind, logged)."""
    task.cancel()
    await asyncio.wait([task], timeout=grace_s)
    if not task.done():
        log.error("%s did not stop within %.1fs of its cancellation", task.get_name(), grace_s)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", task.get_name(), task.exception())
