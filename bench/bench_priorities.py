"""Job priorities on the local Kafka: the measured shares against the configured weights,
and how soon a high job starts behind a low backlog (issue 15).

    python bench/bench_priorities.py            # or `make bench`

Shares: N jobs per level are published first to the three level topics of a fresh
`bench-prio-<uuid>` topic (4 partitions each, with its retry and dead-letter topics), then
one worker (`routing.priorities`, `worker.priority_weights`, default `max_in_flight` 64,
ordering `partition`) drains them with a handler that sleeps `--work-ms`. The levels'
shares are counted over the starts `--skip` to `--skip + --window` (after the first
fetches, while every level still has a backlog; the window must end before the highest
level runs out) and printed against the weights.

Latency: 10,000 low jobs are published, the worker starts (handler `--work-ms`), and once
it ran `--warm` of them (so it is full and holds low records in hand), a high job is
published, `--probes` times, 0.1 s apart; each one's delay from its publish to its
handler's start is printed, with the low jobs still queued at that moment. The same is
measured without priorities, the "urgent" job published to the same topic behind the same
backlog (one FIFO), for comparison.

Exit status: 0, or 1 if a share is off by more than 10% of its weight's, a high job took
1 s or more, or a job was lost or run twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from consumer import App, JobContext, Settings, Worker
from consumer.core import main_destinations
from consumer.kafka import KafkaSource
from schemas import Job, encode, to_kafka

LEVELS = ("high", "normal", "low")
PARTITIONS = 4


class BenchPrio(Job, type="bench.prio", version=1, register=False):
    level: str
    n: int


class Starts:
    """The handler: records each job's level, number and start time, in start order."""

    def __init__(self, work_s: float) -> None:
        self.order: list[tuple[str, int, float]] = []
        self.work_s = work_s
        self.app = App("bench-priorities")
        self.app.handler(BenchPrio)(self.handle)

    async def handle(self, job: BenchPrio, ctx: JobContext) -> None:
        self.order.append((job.level, job.n, time.time()))
        if self.work_s:
            await asyncio.sleep(self.work_s)

    def started(self, level: str, n: int) -> float | None:
        return next((t for lv, m, t in reversed(self.order) if (lv, m) == (level, n)), None)


class Bench:
    def __init__(self, args: argparse.Namespace, admin: AIOKafkaAdminClient) -> None:
        self.args = args
        self.admin = admin
        self.topics: list[str] = []
        self.problems: list[str] = []

    def settings(self, topic: str, *, priorities: bool) -> Settings:
        return Settings(
            kafka={"bootstrap_servers": self.args.bootstrap},
            routing={"routes": {"bench.prio": topic}, "priorities": priorities},
            worker={
                "group": f"bench-prio-{uuid.uuid4().hex[:8]}",
                "priority_weights": dict(zip(LEVELS, self.args.weights, strict=True)),
                "commit_interval_s": 0.5,
            },
        )

    async def new_topic(self, *, priorities: bool) -> dict[str, str]:
        """A fresh topic, its level topics, tiers and dead-letter topic; level -> topic."""
        name = f"bench-prio-{uuid.uuid4().hex[:12]}"
        settings = self.settings(name, priorities=priorities)
        levels = main_destinations(Starts(0).app, settings)
        needed = [*levels, *settings.retry.failure_topics([name])]
        await self.admin.create_topics(
            [NewTopic(name=t, num_partitions=PARTITIONS, replication_factor=1) for t in needed]
        )
        self.topics.extend(needed)
        by_level = {"normal": name}
        if priorities:
            by_level |= {level: f"{name}.priority-{level}" for level in ("high", "low")}
        return by_level

    async def fill(self, jobs: list[tuple[str, str, int]]) -> None:
        """Publish (topic, level, n) jobs with a plain aiokafka producer."""
        producer = AIOKafkaProducer(bootstrap_servers=self.args.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            pending = []
            for topic, level, n in jobs:
                message = encode(BenchPrio(level=level, n=n), source="/bench")
                key, headers = to_kafka(message.attributes)
                pending.append(await producer.send(topic, message.body, key=key, headers=headers))
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.005)


worker_tasks: list[tuple[Worker, asyncio.Task[None]]] = []
"""The workers running (stopped between scenarios, and on the way out)."""


async def run_worker(settings: Settings, starts: Starts, topics: list[str]) -> Worker:
    worker = Worker(starts.app, settings, KafkaSource(settings, topics))
    task = asyncio.create_task(worker.run(), name="bench-priorities-worker")
    worker_tasks.append((worker, task))
    await until(lambda: worker.ready or task.done(), 60, "the worker's assignment")
    return worker


async def stop_workers() -> None:
    for worker, task in worker_tasks:
        worker.stop()
        await task
    worker_tasks.clear()


async def shares(bench: Bench) -> None:
    args = bench.args
    topics = await bench.new_topic(priorities=True)
    jobs = [(topics[level], level, n) for level in LEVELS for n in range(args.n)]
    await bench.fill(jobs)
    settings = bench.settings(topics["normal"], priorities=True)
    starts = Starts(args.work_ms / 1000)
    end = args.skip + args.window
    await run_worker(settings, starts, main_destinations(starts.app, settings))
    clock = time.perf_counter()
    await until(lambda: len(starts.order) >= end, 600, f"{end} starts")
    elapsed = time.perf_counter() - clock
    window = Counter(level for level, _, _ in starts.order[args.skip : end])
    first = Counter(level for level, _, _ in starts.order[: args.skip])
    await until(lambda: len(starts.order) >= 3 * args.n, 600, "every job")
    await stop_workers()
    total = sum(args.weights)
    print(
        f"\nshares: {args.n:,} jobs per level, handler {args.work_ms:g} ms, "
        f"starts {args.skip:,} to {end:,} ({args.window / elapsed:,.0f} jobs/s)"
    )
    print(f"{'level':<8}{'weight':>8}{'expected':>10}{'measured':>10}{'off':>8}{'first':>8}")
    for level, weight in zip(LEVELS, args.weights, strict=True):
        expected = weight / total
        measured = window[level] / args.window
        off = (measured - expected) / expected
        print(
            f"{level:<8}{weight:>8}{expected:>10.1%}{measured:>10.1%}{off:>+8.1%}"
            f"{first[level] / max(args.skip, 1):>8.1%}"
        )
        bench.check(abs(off) <= 0.1, f"{level}: share {measured:.1%}, expected {expected:.1%}")
    counted = Counter((level, n) for level, n, _ in starts.order)
    bench.check(len(counted) == 3 * args.n, f"{3 * args.n - len(counted)} jobs lost")
    bench.check(max(counted.values()) == 1, "a job ran twice")


async def latency(bench: Bench, *, priorities: bool) -> list[float]:
    args = bench.args
    backlog = 10_000
    topics = await bench.new_topic(priorities=priorities)
    low, high = (topics["low"], topics["high"]) if priorities else (topics["normal"],) * 2
    await bench.fill([(low, "low", n) for n in range(backlog)])
    settings = bench.settings(topics["normal"], priorities=priorities)
    starts = Starts(args.latency_work_ms / 1000)
    await run_worker(settings, starts, main_destinations(starts.app, settings))
    await until(lambda: len(starts.order) >= args.warm, 60, "the warm-up")
    delays: list[float] = []
    queued: list[int] = []
    published: list[float] = []
    for probe in range(args.probes):  # published on a clock, not after each one started
        queued.append(backlog - sum(1 for level, _, _ in starts.order if level == "low"))
        published.append(time.time())
        await bench.fill([(high, "high", probe)])
        await asyncio.sleep(0.1)
    for probe in range(args.probes):
        await until(lambda p=probe: starts.started("high", p) is not None, 60, "the high job")
        started = starts.started("high", probe)
        assert started is not None
        delays.append(started - published[probe])
    await until(lambda: len(starts.order) >= backlog + args.probes, 600, "every job")
    await stop_workers()
    label = "with priorities" if priorities else "without (one topic)"
    print(
        f"{label:<22}{statistics.median(delays):>9.3f}s{max(delays):>9.3f}s"
        f"{min(queued):>10,}-{max(queued):,}"
    )
    return delays


async def main(args: argparse.Namespace) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
        await admin.close()
        print(f"error: Kafka is not reachable at {args.bootstrap} ({error!r}): run `make up`")
        return 2
    bench = Bench(args, admin)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # retried "not leader" right after create
    print(
        f"bench_priorities: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, Kafka at {args.bootstrap}, "
        f"weights {dict(zip(LEVELS, args.weights, strict=True))}"
    )
    try:
        if "shares" in args.scenarios:
            await shares(bench)
        if "latency" in args.scenarios:
            print(
                f"\nlatency: a high job published behind 10,000 low ones "
                f"(handler {args.latency_work_ms:g} ms, max_in_flight 64), {args.probes} probes"
            )
            print(f"{'':<22}{'median':>10}{'max':>10}{'low queued':>16}")
            delays = await latency(bench, priorities=True)
            bench.check(max(delays) < 1.0, f"a high job started {max(delays):.3f}s late")
            if not args.no_baseline:
                await latency(bench, priorities=False)
    finally:
        await stop_workers()
        if bench.topics:
            await admin.delete_topics(bench.topics)
        await admin.close()
    for problem in bench.problems:
        print(f"FAILED {problem}")
    return 1 if bench.problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bootstrap", default=os.environ.get("JOBSTREAM_TEST_KAFKA", "127.0.0.1:9092")
    )
    parser.add_argument("--weights", type=int, nargs=3, default=[6, 3, 1], help="high normal low")
    parser.add_argument("--n", type=int, default=20_000, help="shares: jobs per level")
    parser.add_argument("--work-ms", type=float, default=1.0, help="shares: handler sleep")
    parser.add_argument("--skip", type=int, default=2_000, help="shares: starts not counted")
    parser.add_argument("--window", type=int, default=25_000, help="shares: starts counted")
    parser.add_argument("--latency-work-ms", type=float, default=20.0, help="latency: sleep")
    parser.add_argument("--warm", type=int, default=500, help="latency: low jobs run first")
    parser.add_argument("--probes", type=int, default=5, help="latency: high jobs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FIFO comparison")
    parser.add_argument(
        "--scenarios", nargs="+", choices=["shares", "latency"], default=["shares", "latency"]
    )
    args = parser.parse_args()
    end = args.skip + args.window
    highest = max(args.weights) / sum(args.weights)
    if end * highest >= args.n:
        parser.error(f"--n {args.n} runs out before start {end}: raise --n or lower --window")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
