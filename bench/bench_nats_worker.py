"""Worker throughput on the local NATS JetStream: our pipeline against a raw nats-py loop.

    python bench/bench_nats_worker.py       # or `make bench`, which runs every bench/bench_*.py

N small jobs are published once to a fresh stream (`BENCH_<uuid>`, file storage, R1), then
drained, each time by a fresh durable pull consumer (explicit acks, `max_ack_pending`
1000), by
  - raw:  a nats-py loop, `fetch(batch=256)`, nothing decoded, `ack()` per message (fire
          and forget), one `flush()` at the end (the floor any Python consumer starts from);
  - ours: `consumer.Worker` + `NatsSource` + an `App` whose async no-op handler counts jobs:
          attributes parsed, payload validated, idempotency claim/complete (memory store),
          timeout, logging step (WARNING level), each ack confirmed by the server before
          the job counts as settled, `in_progress` heartbeats running.
  - faststream: FastStream 0.7.8 (the `bench` extra, which `make bench` installs) with a
          `PullSub(batch_size=256)` bound to a fresh durable consumer of the same config,
          an async handler taking the body as a pydantic model, its default ack policy
          (`ack()` after the handler, not confirmed by the server); without FastStream
          installed its row is skipped (said so).
With `--partitions P`, a second stream holds the same jobs on P key partitions, drained by
  - ours/keyed: the same worker with `jetstream.key_partitions = P`: one job at a time per
          partition, in order (what strict per-key order costs).
The clock starts once the consumer exists and the worker is ready (connection and consumer
creation are not measured) and stops when the N-th message was acked (raw, after its
flush) or the N-th handler returned (ours). CPU is `time.process_time()` of this process
(the server is another process). 3 repeats, interleaved; the median is reported.
Afterwards every consumer must have no pending and no unacknowledged message, and ours
must have run every job once.

Exit status: 0, or 1 if a run lost or repeated jobs (a correctness failure, not a slow
result).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from pydantic import BaseModel

from consumer import App, JobContext, Settings, Worker
from consumer.nats import NatsSource
from producer.nats import KEY_PARTITIONS_METADATA, key_partition
from schemas import Job, encode, to_nats

RUN_TIMEOUT_S = 180.0
try:  # the `bench` extra: the FastStream row is skipped without it
    import faststream
except ImportError:  # pragma: no cover - depends on the environment
    faststream = None


class BenchNoop(Job, type="bench.noop", version=1, register=False):
    """The smallest useful job: a sequence number to check for loss and duplicates."""

    seq: int


@dataclass
class Measurement:
    jobs: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.jobs / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.jobs * 1e6


class Clock:
    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self, jobs: int) -> Measurement:
        return Measurement(jobs, time.perf_counter() - self._wall, time.process_time() - self._cpu)


@dataclass
class Tally:
    target: int
    done: asyncio.Event = field(default_factory=asyncio.Event)
    completions: int = 0
    seen: set[int] = field(default_factory=set)

    def hit(self, seq: int) -> None:
        self.completions += 1
        self.seen.add(seq)
        if len(self.seen) >= self.target:
            self.done.set()


@dataclass
class Bench:
    url: str
    js: JetStreamContext
    streams: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def new_stream(self, partitions: int = 0) -> tuple[str, str]:
        """A fresh stream capturing `<prefix>.>`; returns (stream, subject of bench.noop)."""
        name = f"BENCH_{uuid.uuid4().hex[:10].upper()}"
        metadata = {KEY_PARTITIONS_METADATA: str(partitions)}
        config = StreamConfig(
            name=name,
            subjects=[f"{name.lower()}.>"],
            storage=StorageType.FILE,
            metadata=metadata,
            allow_msg_schedules=True,  # as `jobstream topics ensure` provisions a stream
        )
        await self.js.add_stream(config)
        self.streams.append(name)
        return name, f"{name.lower()}.bench.noop"

    async def fill(self, subject: str, count: int, partitions: int = 0) -> int:
        """Publish `count` jobs (pipelined PubAcks); return the bytes of one message."""
        size = 0
        pending: list[asyncio.Future[object]] = []
        for seq in range(count):
            key = f"k{seq % 1000}"
            message = encode(BenchNoop(seq=seq), source="/bench", key=key)
            headers = to_nats(message.attributes)
            target = f"{subject}.{key_partition(key, partitions)}" if partitions else subject
            pending.append(await self.js.publish_async(target, message.body, headers=headers))
            if not size:
                size = len(message.body) + sum(len(k) + len(v) for k, v in headers.items())
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return size

    async def drained(self, label: str, stream: str, consumers: list[str]) -> None:
        """Every consumer of the run acknowledged everything (polled: acks land async)."""
        deadline = time.monotonic() + 10
        while True:
            infos = [await self.js.consumer_info(stream, name) for name in consumers]
            if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
                return
            if time.monotonic() > deadline:
                left = sum((i.num_pending or 0) + (i.num_ack_pending or 0) for i in infos)
                self.problems.append(f"{label}: {left} messages not acknowledged")
                return
            await asyncio.sleep(0.05)

    def check(self, label: str, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(f"{label}: {what}")


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {RUN_TIMEOUT_S:.0f}s waiting for {what}")
        await asyncio.sleep(0.001)


# -- the contestants ------------------------------------------------------------------------


async def drain_raw(bench: Bench, stream: str, n: int) -> Measurement:
    name = f"raw-{uuid.uuid4().hex[:8]}"
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000)
    await bench.js.add_consumer(stream, config)
    client = await nats.connect(bench.url)
    try:
        subscription = await client.jetstream().pull_subscribe_bind(name, stream=stream)
        clock = Clock()
        seen = 0
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while seen < n:
                try:
                    messages = await subscription.fetch(256, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for message in messages:
                    await message.ack()
                seen += len(messages)
            await client.flush()
        result = clock.stop(n)
    finally:
        await client.close()
    bench.check("raw", seen == n, f"read {seen} messages, expected {n}")
    await bench.drained("raw", stream, [name])
    return result


class NoopBody(BaseModel):
    """What FastStream's handler takes: the job's JSON body, validated by pydantic."""

    seq: int


async def drain_faststream(bench: Bench, stream: str, subject: str, n: int) -> Measurement:
    """FastStream's NatsBroker, a pull subscriber (batch 256) on a fresh durable consumer
    configured as raw's; checked like the others (n distinct jobs, nothing left unacked)."""
    from faststream.nats import JStream, NatsBroker, PullSub  # noqa: PLC0415 - optional

    name = f"fs-{uuid.uuid4().hex[:8]}"
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000)
    await bench.js.add_consumer(stream, config)
    tally = Tally(target=n)
    broker = NatsBroker(bench.url, logger=None)
    subscriber = broker.subscriber(
        subject,
        stream=JStream(stream, declare=False),
        durable=name,
        pull_sub=PullSub(batch_size=256, timeout=1.0),
    )

    @subscriber
    async def count(body: NoopBody) -> None:
        tally.hit(body.seq)

    await broker.start()
    try:
        clock = Clock()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await tally.done.wait()
        result = clock.stop(n)
    finally:
        await broker.stop()
    label = "faststream"
    bench.check(label, len(tally.seen) == n, f"{len(tally.seen)} distinct jobs ran, expected {n}")
    bench.check(label, tally.completions == n, f"{tally.completions - n} extra runs (duplicates)")
    await bench.drained(label, stream, [name])
    return result


def bench_app(tally: Tally) -> App:
    app = App("bench")

    @app.handler(BenchNoop)
    async def count(job: BenchNoop, ctx: JobContext) -> None:
        tally.hit(job.seq)

    return app


async def drain_ours(
    bench: Bench,
    stream: str,
    subject: str,
    n: int,
    *,
    max_in_flight: int,
    partitions: int = 0,
    label: str = "ours",
) -> Measurement:
    group = f"ours-{uuid.uuid4().hex[:8]}"
    prefix = subject.rpartition(".bench.noop")[0]
    settings = Settings(
        transport="nats",
        nats={"servers": [bench.url]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": group, "max_in_flight": max_in_flight, "ordering": "key"},
        jetstream={"key_partitions": partitions, "max_ack_pending": 1000},
        idempotency={"backend": "memory"},
        logging={"level": "WARNING"},
    )
    tally = Tally(target=n)
    source = NatsSource(settings, [subject])
    worker = Worker(bench_app(tally), settings, source)
    runner = asyncio.create_task(worker.run(), name="bench-worker")
    try:
        await _until(lambda: worker.ready or runner.done(), "the worker to be ready")
        clock = Clock()
        finished = asyncio.create_task(tally.done.wait())
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await asyncio.wait([runner, finished], return_when=asyncio.FIRST_COMPLETED)
        result = clock.stop(n)
        finished.cancel()
    finally:
        worker.stop()
        await runner  # raises WorkerError if the worker stopped by a fault
    bench.check(label, len(tally.seen) == n, f"{len(tally.seen)} distinct jobs ran, expected {n}")
    bench.check(label, tally.completions == n, f"{tally.completions - n} extra runs (duplicates)")
    await bench.drained(label, stream, source.consumers)
    return result


def median(runs: list[Measurement]) -> Measurement:
    return Measurement(
        runs[0].jobs,
        statistics.median(m.wall_s for m in runs),
        statistics.median(m.cpu_s for m in runs),
    )


async def run(bench: Bench, args: argparse.Namespace) -> None:
    n = args.n
    stream, subject = await bench.new_stream()
    started = time.perf_counter()
    size = await bench.fill(subject, n)
    fill_s = time.perf_counter() - started
    keyed: tuple[str, str] | None = None
    if args.partitions:
        keyed = await bench.new_stream(args.partitions)
        await bench.fill(keyed[1], n, args.partitions)
    print(
        f"\nNATS worker throughput: {n:,} jobs, {size} B per message (body + headers), "
        f"1000 keys; filled in {fill_s:.1f}s ({n / fill_s:,.0f} jobs/s)"
    )
    print(f"   ours: max_in_flight={args.max_in_flight}, memory idempotency store, logging WARNING")
    runs: dict[str, list[Measurement]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        runs["raw"].append(await drain_raw(bench, stream, n))
        runs["ours"].append(
            await drain_ours(bench, stream, subject, n, max_in_flight=args.max_in_flight)
        )
        if keyed is not None:
            keyed_run = await drain_ours(
                bench,
                keyed[0],
                keyed[1],
                n,
                max_in_flight=args.max_in_flight,
                partitions=args.partitions,
                label="ours/keyed",
            )
            runs[f"ours/keyed {args.partitions}"].append(keyed_run)
        if faststream is not None and args.faststream:
            runs["faststream"].append(await drain_faststream(bench, stream, subject, n))
    raw = median(runs["raw"])
    print(
        f"\n   {'contestant':<15} {'jobs/s':>9} {'MB/s':>6} {'CPU-us/job':>11} "
        f"{'of raw':>7}   runs (jobs/s)"
    )
    for name, measured in runs.items():
        mid = median(measured)
        each = ", ".join(f"{m.rate:,.0f}" for m in measured)
        print(
            f"   {name:<15} {mid.rate:>9,.0f} {mid.rate * size / 1e6:>6.1f} "
            f"{mid.cpu_us:>11.1f} {mid.rate / raw.rate:>7.0%}   {each}"
        )
    ours = median(runs["ours"])
    verdict = "meets" if ours.rate >= 0.8 * raw.rate else "misses"
    print(
        f"\n   ratio ours/raw = {ours.rate / raw.rate:.2f} ({verdict} the >= 0.80 aim); "
        f"CPU per job ours/raw = {ours.cpu_us / raw.cpu_us:.1f}x"
    )
    if "faststream" in runs:
        fs = median(runs["faststream"])
        verdict = "meets" if ours.rate >= 3 * fs.rate else "misses"
        print(
            f"   ratio ours/faststream = {ours.rate / fs.rate:.1f}x ({verdict} the >= 3x aim); "
            f"CPU per job {fs.cpu_us / ours.cpu_us:.1f}x ours"
        )
    elif args.faststream:
        print("   faststream: not installed (pip install -e '.[bench]'); its row is skipped")


async def main(args: argparse.Namespace) -> int:
    try:
        client = await nats.connect(args.url, connect_timeout=3, max_reconnect_attempts=0)
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"error: NATS is not reachable at {args.url} ({error!r}): run `make up`")
        return 2
    bench = Bench(args.url, client.jetstream())
    started = time.perf_counter()
    print(
        f"bench_nats_worker: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, NATS at {args.url}"
    )
    try:
        await run(bench, args)
    finally:
        for stream in bench.streams:
            await bench.js.delete_stream(stream)
        await client.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {time.perf_counter() - started:.0f}s, peak RSS {peak_mb:.0f} MB")
    for problem in bench.problems:
        print(f"FAILED {problem}")
    return 1 if bench.problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url", default=os.environ.get("JOBSTREAM_TEST_NATS", "nats://127.0.0.1:4222")
    )
    parser.add_argument("--n", type=int, default=20_000, help="jobs (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (median reported)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="limit for ours")
    parser.add_argument(
        "--partitions",
        type=int,
        default=16,
        help="key partitions of the ours/keyed run (0: skip it)",
    )
    parser.add_argument(
        "--no-faststream", dest="faststream", action="store_false", help="skip FastStream"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
