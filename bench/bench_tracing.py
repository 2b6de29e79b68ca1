"""Per-job CPU cost of telemetry in the worker: tracing off, on at 100 % and 10 % sampling,
and metrics on.

    python bench/bench_tracing.py [--jobs 20000] [--repeats 5]

No broker: an in-memory `Source` hands the runtime N prepared deliveries of a no-op job
(each with its own `traceparent` and `joborigin`, as a traced producer writes them), so
what is measured is `consumer.Worker` itself: dispatch, decode, the composed pipeline
(tracing, metrics, logging at WARNING, idempotency with the memory store, failure routing,
timeout, handler) and settle; the prepared deliveries are frozen out of the garbage
collector's way (`gc.freeze()`), as a worker's bounded in-flight set would be. The clock
is `time.process_time()` of the whole process, from `run()` to the N-th settle plus the
flush of the span processor, so the batch exporter's thread is counted too. Modes:

- off:       no SDK provider (the default when no OTEL_* variable asks for traces);
- on 100%:   SDK `TracerProvider`, sampler `traceidratio` 1.0, `BatchSpanProcessor` into an
             exporter that drops the spans (the cost of recording and batching, not of the
             network);
- on 10%:    the same with `traceidratio` 0.1 (what `OTEL_TRACES_SAMPLER=traceidratio`
             does: the worker decides by trace id, whatever the producer decided);
- parent 10%: `parentbased_traceidratio` 0.1, the setting docs/observability.md
             recommends: the producer sampled 10% of the jobs (their `traceparent` has the
             sampled flag), and each attempt follows its producer's decision;
- metrics:   tracing off, the SDK `MeterProvider` with the Prometheus reader `/metrics` uses.

Modes run interleaved, `--repeats` times each; the median is reported, with the difference
to "off" per job. A second table times the telemetry steps alone (the tracing step, the
metrics step) around a no-op `call_next`, which isolates their cost from the rest of the
runtime and from the noise of a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence

from aiokafka import TopicPartition
from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from consumer import App, JobContext, Settings, Worker
from consumer.core import Delivery, JobRun, Outcome, Step
from consumer.telemetry import Telemetry, TracingStep, WorkerMetrics
from schemas import Job, encode

TOPIC = "bench.trace"
MODES = ["off", "on 100%", "on 10%", "parent 10%", "metrics"]
SAMPLED_BY_PRODUCER = {mode: 0.1 if mode == "parent 10%" else 1.0 for mode in MODES}


class BenchTraced(Job, type="bench.traced", version=1, register=False):
    seq: int


class DroppingExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class MemorySource:
    """Hands out prepared deliveries; counts settles."""

    def __init__(self, deliveries: list[Delivery], done: asyncio.Event) -> None:
        self._queue = deque(deliveries)
        self._total = len(deliveries)
        self._done = done
        self.settled = 0
        self.ready = True

    async def start(self, on_revoke: Callable[[Sequence[Hashable]], object]) -> None:
        return None

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        if not self._queue:
            await asyncio.sleep(min(timeout_s, 0.005))
            return []
        count = min(max_records, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    def pause(self) -> None: ...
    def resume(self) -> None: ...

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.settled += 1
        if self.settled == self._total:
            self._done.set()

    def pending_commits(self) -> int:
        return 0

    async def commit(self) -> None: ...

    def owns(self, delivery: Delivery) -> bool:
        return True

    async def stop(self) -> None: ...


def deliveries(n: int, sampled_ratio: float = 1.0) -> list[Delivery]:
    """`sampled_ratio`: the share of jobs whose producer sampled its span (by trace id, as
    `traceidratio` decides), the others' `traceparent` has the flag 00."""
    out = []
    partition = TopicPartition(TOPIC, 0)
    bound = round(sampled_ratio * 2**64)
    # Random ids, as the SDK's `RandomIdGenerator` makes them (not uuid4: its low 64 bits,
    # the ones `traceidratio` compares, start with the variant bits 10, so a ratio below
    # 0.5 would sample none of them).
    ids = random.Random(n)
    for seq in range(n):
        trace_id = f"{ids.getrandbits(128) or 1:032x}"
        span_id = f"{ids.getrandbits(64) or 1:016x}"
        flags = "01" if int(trace_id, 16) & (2**64 - 1) < bound else "00"
        parent = f"00-{trace_id}-{span_id}-{flags}"
        origin = f"00-{trace_id}-{ids.getrandbits(64) or 1:016x}-01"
        message = encode(
            BenchTraced(seq=seq), source="/bench", traceparent=parent, origin_traceparent=origin
        )
        out.append(Delivery(partition, seq, TOPIC, message.attributes, message.body))
    return out


def bench_app() -> App:
    app = App("bench")

    @app.handler(BenchTraced)
    async def noop(job: BenchTraced, ctx: JobContext) -> None:
        return None

    return app


def telemetry_for(mode: str) -> tuple[Telemetry, Callable[[], object]]:
    if mode == "off":
        off = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), False, False)
        return off, lambda: None
    if mode == "metrics":
        registry = CollectorRegistry()
        provider = MeterProvider([PrometheusMetricReader(registry=registry)])
        return Telemetry(trace.NoOpTracerProvider(), provider, False, True, registry), lambda: None
    ratio = 1.0 if mode == "on 100%" else 0.1
    sampler: Sampler = TraceIdRatioBased(ratio)
    if mode == "parent 10%":
        sampler = ParentBased(sampler)
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(DroppingExporter(), max_queue_size=200_000, max_export_batch_size=512)
    )
    telemetry = Telemetry(tracer_provider, metrics.NoOpMeterProvider(), True, False)
    return telemetry, tracer_provider.force_flush


async def run_once(mode: str, n: int) -> float:
    """CPU microseconds per job."""
    app = bench_app()
    settings = Settings(
        worker={"ordering": "none", "max_in_flight": 256}, logging={"level": "WARNING"}
    )
    done = asyncio.Event()
    source = MemorySource(deliveries(n, SAMPLED_BY_PRODUCER[mode]), done)
    # The N prepared deliveries are a backlog a real worker never holds (it fetches at
    # most max_in_flight); frozen, the garbage collector does not walk them on every
    # collection, which would bill their size to whichever mode allocates most.
    gc.collect()
    gc.freeze()
    telemetry, flush = telemetry_for(mode)
    worker = Worker(app, settings, source, telemetry=telemetry)
    started = time.process_time()
    task = asyncio.create_task(worker.run())
    await done.wait()
    flush()
    cpu = time.process_time() - started
    worker.stop()
    await task
    telemetry.shutdown()
    if isinstance(telemetry.tracer_provider, TracerProvider):
        telemetry.tracer_provider.shutdown()
    gc.unfreeze()
    return cpu / n * 1e6


async def step_alone(mode: str, runs: list[JobRun]) -> float:
    """CPU microseconds per job of the telemetry step(s) of `mode` around a no-op."""

    async def completed(run: JobRun) -> Outcome:
        return Outcome.COMPLETED

    async def nothing(run: JobRun, call_next: Callable[[JobRun], object]) -> Outcome:
        return Outcome.COMPLETED

    telemetry, flush = telemetry_for(mode)
    step: Step = nothing
    if telemetry.tracing:
        step = TracingStep(telemetry.tracer("bench"), system="kafka", group="bench")
    elif telemetry.metrics:
        step = WorkerMetrics(
            telemetry.meter("bench"), system="kafka", group="bench", retry=Settings().retry
        )
    started = time.process_time()
    for run in runs:
        await step(run, completed)
    flush()
    cpu = time.process_time() - started
    telemetry.shutdown()
    if isinstance(telemetry.tracer_provider, TracerProvider):
        telemetry.tracer_provider.shutdown()
    return cpu / len(runs) * 1e6


async def main(args: argparse.Namespace) -> None:
    modes = MODES
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    await run_once("off", 2000)  # warm up imports and caches
    for _ in range(args.repeats):
        for mode in modes:
            results[mode].append(await run_once(mode, args.jobs))
    base = statistics.median(results["off"])
    print(f"{args.jobs} jobs per run, {args.repeats} runs per mode, median CPU per job")
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"{'mode':<10} {'CPU us/job':>11} {'vs off':>9} {'min':>7}   runs")
    for mode in modes:
        median = statistics.median(results[mode])
        runs = " ".join(f"{value:.1f}" for value in results[mode])
        print(
            f"{mode:<10} {median:>11.1f} {median - base:>+9.1f} {min(results[mode]):>7.1f}   {runs}"
        )
    runs_alone = {
        ratio: [JobRun(d, None, None, None) for d in deliveries(args.jobs, ratio)]
        for ratio in set(SAMPLED_BY_PRODUCER.values())
    }
    gc.collect()
    gc.freeze()
    alone: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            alone[mode].append(await step_alone(mode, runs_alone[SAMPLED_BY_PRODUCER[mode]]))
    print("\nthe telemetry steps alone (around a no-op), median CPU per job")
    print(f"{'mode':<10} {'CPU us/job':>11}   runs")
    for mode in modes:
        runs = " ".join(f"{value:.1f}" for value in alone[mode])
        print(f"{mode:<10} {statistics.median(alone[mode]):>11.1f}   {runs}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
