"""Worker throughput on the local Kafka: our pipeline against a raw aiokafka loop.

    python bench/bench_worker.py            # or `make bench`, which runs every bench/bench_*.py

S1, overhead floor: N small jobs are published once to a fresh `bench-<uuid>` topic (4
partitions; its retry and dead-letter topics are created too, as a worker expects them),
then drained, each time by a fresh consumer group, by
  - raw:  an aiokafka loop, `getmany(max_records=500)`, nothing decoded, one `commit()` per
          batch (the floor any Python consumer starts from);
  - ours: `consumer.Worker` + `KafkaSource` + an `App` whose async no-op handler counts
          jobs: attributes parsed, payload validated, idempotency claim/complete (memory
          store), timeout, logging step, offsets committed after settle;
  - ours+logs: the same with the production log configuration (INFO, one JSON line per
          job) written to /dev/null;
  - faststream ack-first: FastStream 0.7.8 (the `bench` extra: `pip install -e '.[bench]'`,
          which `make bench` does), `ack_policy=ACK_FIRST, max_workers=256`, an async
          handler taking the body as a pydantic model: its fastest per-job mode that still
          commits (auto-commit every 5 s and at stop, no ordering, a crash loses the jobs
          in flight);
  - faststream ack: `ack_policy=ACK, max_workers=4` (one consumer per partition, a commit
          after each message): its fastest mode that commits after the handler. It runs
          about 500 jobs/s, so it drains only the first `--fs-ack-n` jobs it reads (2,000)
          of the same topic, once per run, and is checked on that count.
The clock starts once the group has assigned the partitions (the join is not measured) and
stops when the N-th record was counted (raw, after its batch's commit) or the N-th handler
returned (ours; its last commit follows in `stop()`). CPU is `time.process_time()` of this
process over the same window (the broker is another process). 3 repeats, interleaved; the
median is reported. Afterwards every group must have committed exactly N offsets, and ours
must have run every job once. Without FastStream installed its rows are skipped (said so).

S4, key mode against partition mode: M jobs on one partition with 100 keys, a handler that
sleeps 5 ms; drain time in `partition` mode (one run: one job at a time whatever the
limit) and in `key` mode (median of the repeats) for each `max_in_flight`. Key mode runs
one job per key at a time, so its speed-up grows with the limit up to the key count, or
until the worker's CPU per job becomes the limit ("key CPU s" against "key ideal s", the
handler's sleeps alone).

Backlog (about 2 minutes for 1,000,000 jobs here; `--scenarios s1 s4` skips it): a child
process publishes `--backlog-n` jobs to a fresh topic, then one worker (defaults but
`max_in_flight` 256) drains them; the peak RSS of this process (which never
held the backlog: the child filled it) must stay under 250 MB, every job must run once and
N offsets must be committed.

Exit status: 0, or 1 if a run lost, repeated or reordered jobs (a correctness failure, not
a slow result). `--profile` adds one cProfile'd drain of ours and prints its hot spots.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import io
import logging
import os
import pstats
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import BaseModel

from consumer import App, JobContext, Settings, Worker
from consumer.core import main_destinations
from consumer.kafka import KafkaSource
from consumer.telemetry import JsonFormatter
from schemas import Job, encode, to_kafka

RUN_TIMEOUT_S = 120.0
RSS_GOAL_MB = 250
try:  # the `bench` extra: FastStream rows are skipped without it
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
    """Wall and CPU time of this process from `start()`."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def stop(self, jobs: int) -> Measurement:
        return Measurement(jobs, time.perf_counter() - self._wall, time.process_time() - self._cpu)


@dataclass
class Tally:
    """What the handler saw: completions, distinct jobs, per-key order violations. Seen
    jobs are one byte each (a million jobs: 1 MB, not the 60 MB of a set of ints)."""

    target: int
    space: int = 0  # sequence numbers 0 .. max(space, target) - 1 may arrive
    done: asyncio.Event = field(default_factory=asyncio.Event)
    completions: int = 0
    distinct: int = 0
    last_by_key: dict[str | None, int] = field(default_factory=dict)
    out_of_order: int = 0
    seen: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.seen = bytearray(max(self.space, self.target))

    def hit(self, seq: int, key: str | None) -> None:
        self.completions += 1
        if 0 <= seq < len(self.seen) and not self.seen[seq]:
            self.seen[seq] = 1
            self.distinct += 1
        if key is not None:
            if self.last_by_key.get(key, -1) > seq:
                self.out_of_order += 1
            self.last_by_key[key] = seq
        if self.distinct >= self.target:
            self.done.set()


@dataclass
class Bench:
    bootstrap: str
    admin: AIOKafkaAdminClient
    topics: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def new_topic(self, partitions: int) -> str:
        """A fresh job topic plus the retry/dead-letter topics a worker of it expects, as
        `jobstream topics ensure` would provision them."""
        name = f"bench-{uuid.uuid4().hex[:12]}"
        settings = settings_for(self, name, "")
        topics = main_destinations(bench_app(Tally(0), 0), settings)
        needed = [name, *settings.retry.failure_topics(topics)]
        await self.admin.create_topics(
            [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in needed]
        )
        self.topics.extend(needed)
        return name

    async def fill(self, topic: str, count: int, key_of: Callable[[int], str]) -> int:
        """Publish `count` jobs with a plain aiokafka producer; return the bytes of one."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
        )
        await producer.start()
        size = 0
        try:
            pending: list[asyncio.Future[object]] = []
            for seq in range(count):
                message = encode(BenchNoop(seq=seq), source="/bench", key=key_of(seq))
                key, headers = to_kafka(message.attributes)
                pending.append(await producer.send(topic, message.body, key=key, headers=headers))
                if not size:
                    size = (
                        len(message.body)
                        + len(key or b"")
                        + sum(len(n) + len(v) for n, v in headers)
                    )
                if len(pending) >= 10_000:  # bounded: a million futures would be ~1 GB
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return size

    async def committed(self, group: str) -> int:
        offsets = await self.admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values())

    def check(self, label: str, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(f"{label}: {what}")


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {RUN_TIMEOUT_S:.0f}s waiting for {what}")
        await asyncio.sleep(0.001)


# -- the contestants ----------------------------------------------------------------------


async def drain_raw(bench: Bench, topic: str, n: int) -> Measurement:
    group = f"bench-raw-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bench.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # as KafkaSource reads
    )
    await consumer.start()
    try:
        await _until(lambda: bool(consumer.assignment()), "the raw consumer's assignment")
        clock = Clock()
        seen = 0
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while seen < n:
                batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                if batches:
                    seen += sum(len(records) for records in batches.values())
                    await consumer.commit()
        result = clock.stop(n)
    finally:
        await consumer.stop()
    bench.check("raw", seen == n, f"read {seen} records, expected {n}")
    bench.check("raw", await bench.committed(group) == n, "committed offsets do not sum to N")
    return result


def settings_for(bench: Bench, topic: str, group: str, **worker: object) -> Settings:
    """Defaults, except: this Kafka, `bench.noop` routed to `topic`, the given worker fields."""
    return Settings(
        kafka={"bootstrap_servers": bench.bootstrap},
        routing={"routes": {BenchNoop.job_type: topic}},
        worker={"group": group, **worker},
        idempotency={"backend": "memory"},
    )


def bench_app(tally: Tally, sleep_s: float) -> App:
    app = App("bench")

    @app.handler(BenchNoop)
    async def count(job: BenchNoop, ctx: JobContext) -> None:
        if sleep_s:
            await asyncio.sleep(sleep_s)
        tally.hit(job.seq, ctx.key)

    return app


async def drain_ours(
    bench: Bench,
    topic: str,
    n: int,
    *,
    max_in_flight: int,
    ordering: str = "key",
    sleep_s: float = 0.0,
    label: str = "ours",
) -> tuple[Measurement, Tally]:
    group = f"bench-ours-{uuid.uuid4().hex[:8]}"
    settings = settings_for(bench, topic, group, max_in_flight=max_in_flight, ordering=ordering)
    tally = Tally(target=n)
    worker = Worker(bench_app(tally, sleep_s), settings, KafkaSource(settings, [topic]))
    runner = asyncio.create_task(worker.run(), name="bench-worker")
    try:
        await _until(lambda: worker.ready or runner.done(), "the worker's assignment")
        clock = Clock()
        finished = asyncio.create_task(tally.done.wait())
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await asyncio.wait([runner, finished], return_when=asyncio.FIRST_COMPLETED)
        result = clock.stop(n)
        finished.cancel()
    finally:
        worker.stop()
        await runner  # raises WorkerError if the worker stopped by a fault
    bench.check(label, tally.distinct == n, f"{tally.distinct} distinct jobs ran, expected {n}")
    bench.check(label, tally.completions == n, f"{tally.completions - n} extra runs (duplicates)")
    bench.check(label, tally.out_of_order == 0, f"{tally.out_of_order} per-key order violations")
    bench.check(label, await bench.committed(group) == n, "committed offsets do not sum to N")
    return result, tally


class NoopBody(BaseModel):
    """What FastStream's handler takes: the job's JSON body, validated by pydantic."""

    seq: int


FASTSTREAM_MODES = {
    # label: subscriber options. ACK_FIRST is FastStream's fastest per-job mode that still
    # commits (aiokafka's auto-commit); ACK commits after each handler return.
    "faststream ack-first": {"ack_policy": "ACK_FIRST", "max_workers": 256},
    "faststream ack": {"ack_policy": "ACK", "max_workers": 4},
}


def _fs_consumers(subscriber: Any) -> list[Any]:
    group = getattr(subscriber, "consumer_subgroup", None) or [subscriber.consumer]
    return [c for c in group if c is not None]


async def drain_faststream(
    bench: Bench, topic: str, n: int, mode: str, published: int
) -> Measurement:
    """FastStream's KafkaBroker drains `n` jobs of `topic` (all of it, or the first `n` it
    handles) with a fresh group; checked like ours: n distinct jobs, no duplicate, n
    offsets committed."""
    from faststream import AckPolicy  # noqa: PLC0415 - optional (the bench extra)
    from faststream.kafka import KafkaBroker  # noqa: PLC0415 - optional (the bench extra)

    options = FASTSTREAM_MODES[mode]
    group = f"bench-fs-{uuid.uuid4().hex[:8]}"
    tally = Tally(target=n, space=published)
    broker = KafkaBroker(bench.bootstrap, logger=None)
    subscriber = broker.subscriber(
        topic,
        group_id=group,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        ack_policy=AckPolicy[str(options["ack_policy"])],
        max_workers=int(options["max_workers"]),
    )

    @subscriber
    async def count(body: NoopBody) -> None:
        if tally.distinct < n:  # stopping after n: later jobs are not counted
            tally.hit(body.seq, None)

    await broker.start()
    try:
        # Every member assigned (ACK with max_workers runs one consumer per partition).
        await _until(
            lambda: sum(len(c.assignment()) for c in _fs_consumers(subscriber)) >= 4,
            "FastStream's assignment",
        )
        before = tally.completions  # jobs run before the last member joined
        clock = Clock()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await tally.done.wait()
        result = clock.stop(n - before)
    finally:
        await broker.stop()  # ACK_FIRST: aiokafka's last auto-commit happens here
    bench.check(mode, tally.distinct == n, f"{tally.distinct} distinct jobs ran, expected {n}")
    bench.check(mode, tally.completions == n, f"{tally.completions - n} extra runs (duplicates)")
    committed = await bench.committed(group)
    # ACK commits each job after its handler; a job handled after the n-th is not counted
    # but may be committed, so ACK is checked for at least n and ACK_FIRST for exactly n.
    exact = options["ack_policy"] == "ACK_FIRST"
    ok = committed == n if exact else committed >= n
    bench.check(mode, ok, f"committed offsets sum to {committed}, expected {n}")
    return result


@contextlib.contextmanager
def json_job_logs() -> Iterator[None]:
    """The production log setup (INFO, one JSON line per job), written to /dev/null."""
    root = logging.getLogger("jobstream")
    saved = (root.handlers[:], root.level, root.propagate)
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        root.propagate = False
        try:
            yield
        finally:
            root.handlers[:], level, root.propagate = saved
            root.setLevel(level)


# -- scenarios ----------------------------------------------------------------------------


def median(runs: list[Measurement]) -> Measurement:
    wall = statistics.median(m.wall_s for m in runs)
    cpu = statistics.median(m.cpu_s for m in runs)
    return Measurement(runs[0].jobs, wall, cpu)


async def scenario_s1(bench: Bench, args: argparse.Namespace) -> None:
    n = args.n
    topic = await bench.new_topic(partitions=4)
    started = time.perf_counter()
    size = await bench.fill(topic, n, lambda seq: f"k{seq % args.s1_keys}")
    fill_s = time.perf_counter() - started
    print(
        f"\nS1 overhead floor: {n:,} jobs, 4 partitions, {args.s1_keys} keys, "
        f"{size} B per record (value + key + headers)"
    )
    print(
        f"   filled in {fill_s:.1f}s ({n / fill_s:,.0f} jobs/s, plain aiokafka producer, "
        "encode + to_kafka per job)"
    )
    print(
        f"   ours: ordering=key, max_in_flight={args.max_in_flight}, memory idempotency "
        "store, other settings default (commit_every=500, commit_interval_s=1.0)"
    )
    runs: dict[str, list[Measurement]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        runs["raw"].append(await drain_raw(bench, topic, n))
        ours, _ = await drain_ours(bench, topic, n, max_in_flight=args.max_in_flight)
        runs["ours"].append(ours)
        with json_job_logs():
            logged, _ = await drain_ours(
                bench, topic, n, max_in_flight=args.max_in_flight, label="ours+logs"
            )
        runs["ours+logs"].append(logged)
        if faststream is not None and args.faststream:
            fs = await drain_faststream(bench, topic, n, "faststream ack-first", n)
            runs["faststream ack-first"].append(fs)
    if faststream is not None and args.faststream and args.fs_ack_n:
        # About 500 jobs/s: once per run, on the first jobs it reads of the same topic.
        fs_n = min(args.fs_ack_n, n)
        slow = await drain_faststream(bench, topic, fs_n, "faststream ack", n)
        runs["faststream ack"].append(slow)
    raw = median(runs["raw"])
    print(
        f"\n   {'contestant':<20} {'jobs/s':>9} {'MB/s':>6} {'CPU-us/job':>11} "
        f"{'of raw':>7}   runs (jobs/s)"
    )
    for name, measured in runs.items():
        mid = median(measured)
        each = ", ".join(f"{m.rate:,.0f}" for m in measured)
        print(
            f"   {name:<20} {mid.rate:>9,.0f} {mid.rate * size / 1e6:>6.1f} "
            f"{mid.cpu_us:>11.1f} {mid.rate / raw.rate:>7.0%}   {each}"
        )
    ours = median(runs["ours"])
    verdict = "meets" if ours.rate >= 0.5 * raw.rate else "misses"
    print(
        f"\n   ratio ours/raw = {ours.rate / raw.rate:.2f} ({verdict} the >= 0.50 aim); "
        f"CPU per job ours/raw = {ours.cpu_us / raw.cpu_us:.1f}x"
    )
    if "faststream ack-first" in runs:
        fs = median(runs["faststream ack-first"])
        verdict = "meets" if ours.rate >= 5 * fs.rate else "misses"
        print(
            f"   ratio ours/faststream ack-first = {ours.rate / fs.rate:.1f}x ({verdict} the "
            f">= 5x aim); CPU per job {fs.cpu_us / ours.cpu_us:.1f}x ours"
        )
        if "faststream ack" in runs:
            slow = median(runs["faststream ack"])
            print(f"   ratio ours/faststream ack (commit per job) = {ours.rate / slow.rate:.0f}x")
    elif args.faststream:
        print("   faststream: not installed (pip install -e '.[bench]'); its rows are skipped")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        await drain_ours(bench, topic, n, max_in_flight=args.max_in_flight, label="profiled")
        profile.disable()
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"consumer|schemas", 25)
        print(
            "\n   cProfile of one drain of ours, by own time, then by cumulative time "
            "(jobstream functions only):\n" + out.getvalue()
        )


async def scenario_s4(bench: Bench, args: argparse.Namespace) -> None:
    m, keys = args.m, args.keys
    topic = await bench.new_topic(partitions=1)
    await bench.fill(topic, m, lambda seq: f"k{seq % keys}")
    print(
        f"\nS4 key mode vs partition mode: {m:,} jobs, 1 partition, {keys} keys, "
        f"handler sleeps {args.sleep_ms} ms"
    )
    print(
        f"\n   {'max_in_flight':>13} {'partition s':>12} {'key s':>8} {'key CPU s':>10} "
        f"{'key ideal s':>12} {'key jobs/s':>11} {'speed-up':>9}   key runs (s)"
    )
    for limit in args.in_flight:
        # Partition mode runs one job at a time whatever the limit: one run is enough. Key
        # mode is short, and a drain's end varies by up to the fetch wait: median of repeats.
        runs: dict[str, list[Measurement]] = collections.defaultdict(list)
        for ordering in ["partition"] + ["key"] * args.repeats:
            measured, _ = await drain_ours(
                bench,
                topic,
                m,
                max_in_flight=limit,
                ordering=ordering,
                sleep_s=args.sleep_ms / 1000,
                label=f"S4 {ordering} {limit}",
            )
            runs[ordering].append(measured)
        part, key = runs["partition"][0], median(runs["key"])
        # The handler's sleeps alone, with min(limit, keys) of them overlapping. Key mode
        # falls short of it where the per-job CPU (the "key CPU s" column) is the limit.
        ideal = m * args.sleep_ms / 1000 / min(limit, keys)
        each = ", ".join(f"{r.wall_s:.2f}" for r in runs["key"])
        speed_up = part.wall_s / key.wall_s
        print(
            f"   {limit:>13} {part.wall_s:>12.2f} {key.wall_s:>8.2f} {key.cpu_s:>10.2f} "
            f"{ideal:>12.2f} {key.rate:>11,.0f} {speed_up:>8.1f}x   {each}"
        )


def rss_mb() -> float:
    """This process's resident set now (Linux), in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def scenario_backlog(bench: Bench, args: argparse.Namespace) -> None:
    n = args.backlog_n
    topic = await bench.new_topic(partitions=4)
    started = time.perf_counter()
    # A child fills the topic, so this process never holds the backlog's futures: its peak
    # RSS is the worker's (plus the interpreter and this bench's one byte per job).
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--fill-only",
        topic,
        "--n",
        str(n),
        "--bootstrap",
        bench.bootstrap,
        "--s1-keys",
        str(args.s1_keys),
    )
    if await child.wait() != 0:
        bench.check("backlog", False, f"the filling child failed (exit {child.returncode})")
        return
    fill_s = time.perf_counter() - started
    before = rss_mb()
    peak_sampled = before

    async def sample() -> None:
        nonlocal peak_sampled
        while True:
            peak_sampled = max(peak_sampled, rss_mb())
            await asyncio.sleep(0.1)

    print(
        f"\nBacklog: {n:,} jobs filled in {fill_s:.0f}s by a child process, 4 partitions, "
        f"{args.s1_keys} keys; draining with one worker (defaults but max_in_flight="
        f"{args.max_in_flight}, memory idempotency store); RSS before the drain {before:.0f} MB"
    )
    sampler = asyncio.create_task(sample())
    try:
        measured, _ = await drain_ours(
            bench, topic, n, max_in_flight=args.max_in_flight, label="backlog"
        )
    finally:
        sampler.cancel()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    verdict = "meets" if peak < RSS_GOAL_MB else "misses"
    print(
        f"   drained in {measured.wall_s:.0f}s ({measured.rate:,.0f} jobs/s, "
        f"{measured.cpu_us:.0f} CPU-us/job); peak RSS {peak:.0f} MB ({verdict} < "
        f"{RSS_GOAL_MB} MB; sampled every 0.1 s during the drain: {peak_sampled:.0f} MB); "
        "each job once, N offsets committed: checked below"
    )


async def fill_only(args: argparse.Namespace) -> int:
    """The backlog scenario's child: publish `--n` jobs to an existing topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await Bench(args.bootstrap, admin).fill(
            args.fill_only, args.n, lambda seq: f"k{seq % args.s1_keys}"
        )
    finally:
        await admin.close()
    return 0


async def main(args: argparse.Namespace) -> int:
    if args.fill_only:
        return await fill_only(args)
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
        await admin.close()
        print(f"error: Kafka is not reachable at {args.bootstrap} ({error!r}): run `make up`")
        return 2
    bench = Bench(args.bootstrap, admin)
    started = time.perf_counter()
    # Another process busy on the same cores skews every number: show the load we start at.
    print(
        f"bench_worker: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, Kafka at {args.bootstrap}"
    )
    try:
        if "s1" in args.scenarios:
            await scenario_s1(bench, args)
        if "s4" in args.scenarios:
            await scenario_s4(bench, args)
        if "backlog" in args.scenarios:
            await scenario_backlog(bench, args)
    finally:
        if bench.topics:
            await admin.delete_topics(bench.topics)
        await admin.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {time.perf_counter() - started:.0f}s, peak RSS {peak_mb:.0f} MB")
    for problem in bench.problems:
        print(f"FAILED {problem}")
    return 1 if bench.problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bootstrap", default=os.environ.get("JOBSTREAM_TEST_KAFKA", "127.0.0.1:9092")
    )
    parser.add_argument("--n", type=int, default=50_000, help="S1 jobs (default 50,000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (median reported)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="S1 limit for ours")
    parser.add_argument("--s1-keys", type=int, default=1000, help="S1 distinct ordering keys")
    parser.add_argument("--m", type=int, default=2000, help="S4 jobs (default 2,000)")
    parser.add_argument("--keys", type=int, default=100, help="S4 distinct ordering keys")
    parser.add_argument("--sleep-ms", type=float, default=5.0, help="S4 handler sleep")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=["s1", "s4", "backlog"],
        default=["s1", "s4", "backlog"],
        help="scenarios to run (default: all; backlog takes about 2 minutes)",
    )
    parser.add_argument(
        "--backlog-n", type=int, default=1_000_000, help="backlog jobs (default 1,000,000)"
    )
    parser.add_argument("--fill-only", metavar="TOPIC", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="cProfile one drain of ours")
    parser.add_argument(
        "--no-faststream", dest="faststream", action="store_false", help="skip FastStream"
    )
    parser.add_argument(
        "--fs-ack-n", type=int, default=2000, help="jobs of the FastStream ACK run (0: skip it)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
