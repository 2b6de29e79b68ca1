"""The worker's CPU per job with each idempotency store: memory, Redis, PostgreSQL, NATS KV.

    .venv/bin/python bench/bench_stores.py [--n 10000] [--repeats 3] [--stores memory redis]

No broker: an in-memory source hands `consumer.Worker` N prepared deliveries of a no-op job
(1,000 ordering keys, `ordering=key`, 256 in flight, logging at WARNING, telemetry off), so
what is measured is the runtime and its store: decode, the step chain, one claim and one
completion per job in the store, settle. The stores are the local servers `make up`
starts (each run uses a namespace of its own). The clock is `time.process_time()` of this
process from `run()` to the N-th settle (the store servers' CPU is not in it); wall time
is printed beside it. Contestants are interleaved in each repeat; the median is reported.
Every run checks that N distinct jobs settled, each once, and that a second delivery of
each job is skipped as a duplicate (the store really recorded every completion).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence

import nats
import psycopg
import redis.asyncio as redis
from aiokafka import TopicPartition
from opentelemetry import metrics, trace

from consumer import App, JobContext, Settings, Worker
from consumer._backends import open_idempotency_store
from consumer.core import Delivery, Outcome
from consumer.stores import IdempotencyStore, MemoryIdempotencyStore, StatusStore, open_status_store
from consumer.telemetry import Telemetry
from schemas import Job, encode

TOPIC = "bench.stores"
URLS = {
    "redis": "redis://127.0.0.1:6379/0",
    "postgres": "postgresql://jobstream@127.0.0.1:5432/postgres",
    "nats-kv": "nats://127.0.0.1:4222",
}


class BenchStored(Job, type="bench.stored", version=1, register=False):
    seq: int


class PreparedSource:
    """Hands out prepared deliveries; records each settle's outcome."""

    def __init__(self, deliveries: list[Delivery], done: asyncio.Event) -> None:
        self._queue = deque(deliveries)
        self._total = len(deliveries)
        self._done = done
        self.outcomes: Counter[Outcome] = Counter()
        self.settled: Counter[int] = Counter()
        self.ready = True

    async def start(self, on_revoke: Callable[[Sequence[Hashable]], object]) -> None:
        return None

    async def fetch(self, max_records: int, timeout_s: float) -> list[Delivery]:
        if not self._queue:
            await asyncio.sleep(min(timeout_s, 0.005))
            return []
        return [self._queue.popleft() for _ in range(min(max_records, len(self._queue)))]

    def pause(self) -> None: ...
    def resume(self) -> None: ...

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.outcomes[outcome] += 1
        self.settled[delivery.offset] += 1
        if sum(self.settled.values()) == self._total:
            self._done.set()

    def pending_commits(self) -> int:
        return 0

    async def commit(self) -> None: ...

    def owns(self, delivery: Delivery) -> bool:
        return True

    async def stop(self) -> None: ...


def prepared(n: int) -> list[Delivery]:
    partition = TopicPartition(TOPIC, 0)
    out = []
    for seq in range(n):
        message = encode(BenchStored(seq=seq), source="/bench", key=f"k{seq % 1000}")
        out.append(Delivery(partition, seq, TOPIC, message.attributes, message.body))
    return out


def bench_app() -> App:
    app = App("bench")

    @app.handler(BenchStored)
    async def noop(job: BenchStored, ctx: JobContext) -> None:
        return None

    return app


async def open_store(name: str, namespace: str) -> IdempotencyStore:
    if name == "memory":
        return MemoryIdempotencyStore()
    idempotency = {"backend": name, "url": URLS[name], "namespace": namespace}
    return await open_idempotency_store(Settings.model_validate({"idempotency": idempotency}))


async def clean_up(name: str, namespace: str) -> None:
    """Delete what a run left in the shared servers (its keys, table or bucket)."""
    if name == "postgres":
        async with await psycopg.AsyncConnection.connect(URLS[name], autocommit=True) as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {namespace}_idempotency")
    elif name == "nats-kv":
        client = await nats.connect(URLS[name])
        with contextlib.suppress(Exception):
            await client.jetstream().delete_key_value(f"{namespace}_idempotency")
        await client.close()
    elif name == "redis":
        client = redis.Redis.from_url(URLS[name])
        keys = [key async for key in client.scan_iter(f"{namespace}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()


async def drain(
    store: IdempotencyStore, deliveries: list[Delivery], status: StatusStore | None = None
) -> tuple[float, float, PreparedSource]:
    """CPU and wall seconds to settle `deliveries` once, and the source that saw it."""
    settings = Settings(
        worker={"ordering": "key", "max_in_flight": 256}, logging={"level": "WARNING"}
    )
    done = asyncio.Event()
    source = PreparedSource(deliveries, done)
    off = Telemetry(trace.NoOpTracerProvider(), metrics.NoOpMeterProvider(), False, False)
    worker = Worker(bench_app(), settings, source, store=store, status=status, telemetry=off)
    cpu, wall = time.process_time(), time.perf_counter()
    running = asyncio.create_task(worker.run())
    async with asyncio.timeout(300):
        await done.wait()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    worker.stop()
    await running
    return cpu, wall, source


async def run_once(
    name: str, deliveries: list[Delivery], problems: list[str], status_backend: str = "none"
) -> float:
    """CPU µs per job of one drain (and a check that a second delivery is skipped)."""
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    store = await open_store(name, namespace)
    status = None
    if status_backend == "redis":
        status = await open_status_store("redis", URLS["redis"], namespace, 600)
    try:
        gc.collect()
        cpu, wall, first = await drain(store, deliveries, status)
        _, _, again = await drain(store, deliveries)
        if status is not None:
            found = [
                await status.get(d.attributes.id)
                for d in deliveries[:: max(1, len(deliveries) // 100)]
                if d.attributes
            ]
            if any(s is None or s.state != "succeeded" for s in found):
                problems.append(f"{name}: a job's status is not succeeded")
    finally:
        await store.close()
        if status is not None:
            await status.close()
            await clean_up("redis", namespace)
        await clean_up(name, namespace)
    n = len(deliveries)
    if set(first.settled) != set(range(n)) or max(first.settled.values()) != 1:
        problems.append(f"{name}: {len(first.settled)} distinct jobs settled, expected {n}")
    if first.outcomes[Outcome.COMPLETED] != n:
        problems.append(f"{name}: {dict(first.outcomes)} on the first delivery")
    if again.outcomes[Outcome.DUPLICATE] != n:
        problems.append(f"{name}: {dict(again.outcomes)} on the second delivery")
    print(f"   {name:<9} {cpu / n * 1e6:8.1f} us CPU/job  {n / wall:9,.0f} jobs/s")
    return cpu / n * 1e6


async def main(args: argparse.Namespace) -> int:
    print(
        f"bench_stores: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; {args.n:,} jobs per drain; "
        f"status store: {args.status}"
    )
    deliveries = prepared(args.n)
    await run_once("memory", deliveries[:1000], [])  # warm up imports and caches
    results: dict[str, list[float]] = {name: [] for name in args.stores}
    problems: list[str] = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}")
        for name in args.stores:
            results[name].append(await run_once(name, deliveries, problems, args.status))
    print(f"\n   {'store':<9} {'CPU us/job':>11}   runs   (load average {os.getloadavg()[0]:.2f})")
    for name, runs in results.items():
        each = " / ".join(f"{r:.1f}" for r in runs)
        print(f"   {name:<9} {statistics.median(runs):>11.1f}   {each}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="jobs per drain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stores",
        nargs="+",
        default=["memory", "redis", "postgres", "nats-kv"],
        choices=["memory", *URLS],
    )
    parser.add_argument(
        "--status", choices=["none", "redis"], default="none", help="a status store too"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
