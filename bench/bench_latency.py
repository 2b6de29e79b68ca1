"""Publish-to-handler latency at a paced load on Kafka and NATS: jobstream against bare clients.

    python bench/bench_latency.py            # or `make bench`, which runs every bench/bench_*.py
    python bench/bench_latency.py --rate 1000 --seconds 30 --repeats 1 --transport both

Each contestant gets a fresh `bench-<uuid>` topic (4 partitions; a worker's retry and
dead-letter topics too, as `jobstream topics ensure` would make them) and one acknowledged
probe record per partition (a topic this young answers its first produce with
NOT_LEADER_FOR_PARTITION and aiokafka retries 100 ms later: a stall of the test setup, not
of a client); its consumer or worker is started and has its partitions assigned, its
producer is connected; then a pacer
publishes `rate` jobs per second for `seconds` (job i is due at start + i / rate; a late
pacer publishes at once, and its lateness is reported as "pacer late"). Every job carries
`perf_counter_ns()` taken just before its publish call (in the JSON body: everything runs in
this one process, so one clock serves both ends). Two HdrHistograms per contestant:

  - publish ack: from the publish call to the broker's acknowledgement (the future of
    `send()` done, or `JobProducer.publish()` returned);
  - publish to handler: from the publish call to the handler's first line (bare: the record
    taken out of `getmany()`).

Contestants, interleaved in each repeat (the same process, the same load):
  - bare linger 0 / bare linger 5: `AIOKafkaProducer(acks="all", enable_idempotence=True,
    linger_ms=0|5)` (jobstream's producer settings) and an `AIOKafkaConsumer` (auto-commit
    off, `read_committed` as jobstream reads) in a `getmany()` loop that decodes the body,
    with a commit every 0.2 s from a task of its own;
  - jobstream defaults: `JobProducer.publish()` per job with `ProducerSettings()` defaults
    (linger 5 ms) and `consumer.Worker` + `KafkaSource` with `Settings()` defaults
    (`max_in_flight` 64, key order, memory idempotency store) and the production log setup
    (INFO, one JSON line per job, written to /dev/null);
  - jobstream tuned: the settings chosen for latency: `kafka.linger_ms = 0`, job logs at
    WARNING (no line per job), and one publish before the load (the producer then checks
    the topic's metadata once, instead of once per publish started before the first
    check returned: the first-second stall of the defaults); everything else as above.
  - `--variant SETTINGS` adds a jobstream contestant: `linger=0,logs=info,warm=yes,flight=64`
    and `producer=bare` (a bare producer feeding the worker: the worker side alone).
On NATS (a fresh stream per contestant, file storage, R1):
  - bare nats: nats-py `publish_async` (its PubAck is the ack) and a durable pull consumer,
    `fetch(256)` and `ack()` per message;
  - jobstream nats defaults / quiet logs: `JobProducer.publish()` and `Worker` +
    `NatsSource` with the defaults (64 in flight, every ack confirmed by the server), job
    logs at INFO (one JSON line per job, to /dev/null) or at WARNING.
  The NATS counterpart of committed offsets is the consumer's acknowledged stream sequence
  once nothing is pending.

A job counts once its handler ran; the run ends when all were handled (or after a
timeout). Then every contestant is checked: N distinct jobs, no duplicate, N offsets (plus
the probes) committed by its group, no failed publish. Each run's line names the worst
publish ack and when it happened (seconds after the first publish), how many acks took
more than 50 ms in the first second and after it, and handler - ack per job (the consumer
side alone). The tables add the p99 of each second of load (median and worst second): on
a shared machine the worst second shows when this process did not get the CPU (the pacer's
lateness says so too), the median second the steady state.

Exit status: 0, or 1 if a run lost or repeated jobs or left offsets uncommitted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hdrh.histogram import HdrHistogram
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from consumer import App, JobContext, Settings, Worker
from consumer.core import main_destinations
from consumer.kafka import KafkaSource
from consumer.nats import NatsSource
from consumer.telemetry import JsonFormatter
from producer import JobProducer, ProducerSettings
from schemas import Job, encode, to_kafka

SETTLE_TIMEOUT_S = 60.0
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
SLOW_ACK_MS = 50.0


class BenchStamp(Job, type="bench.stamp", version=1, register=False):
    """A sequence number (loss and duplicate checks) and the publish call's clock."""

    seq: int
    t_ns: int


@dataclass
class Recorder:
    """What one contestant's run saw: both histograms (µs), the handled jobs, the acks."""

    target: int
    started_ns: int = 0
    e2e: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    ack: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    seen: set[int] = field(default_factory=set)
    handled: int = 0
    acks: list[tuple[int, int]] = field(default_factory=list)  # (publish ns, ack µs)
    acked_at: dict[int, int] = field(default_factory=dict)  # seq -> ack ns
    handled_at: dict[int, int] = field(default_factory=dict)  # seq -> handler ns
    per_second: dict[int, list[int]] = field(default_factory=dict)  # second -> e2e µs
    pacer_late_ns: int = 0
    failed_publishes: int = 0
    probes: int = 0  # records published before the load (seq < 0): committed, not measured
    cpu_s: float = 0.0  # this process, from the first publish to the last job handled
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def handle(self, seq: int, t_ns: int) -> None:
        if seq < 0:
            return
        now = time.perf_counter_ns()
        self.handled_at.setdefault(seq, now)
        micros = max((now - t_ns) // 1000, 1)
        self.e2e.record_value(micros)
        self.per_second.setdefault((t_ns - self.started_ns) // 1_000_000_000, []).append(micros)
        self.handled += 1
        self.seen.add(seq)
        if len(self.seen) >= self.target:
            self.cpu_s += time.process_time()
            self.done.set()

    def acked(self, seq: int, t_ns: int) -> None:
        now = time.perf_counter_ns()
        micros = max((now - t_ns) // 1000, 1)
        self.ack.record_value(micros)
        self.acks.append((t_ns, micros))
        self.acked_at[seq] = now

    def after_ack(self) -> str:
        """The consumer side alone: handler time minus ack time, per job (negative when the
        handler ran before the producer saw its ack)."""
        gaps = sorted(
            (self.handled_at[seq] - at) / 1e6
            for seq, at in self.acked_at.items()
            if seq in self.handled_at
        )
        if not gaps:
            return "n/a"
        pick = [gaps[min(int(len(gaps) * p / 100), len(gaps) - 1)] for p in (50, 99)]
        return f"handler - ack p50 {pick[0]:.2f} ms, p99 {pick[1]:.2f} ms"

    def second_p99s(self) -> list[float]:
        """The p99 (ms) of publish to handler of each second of load, in order."""
        result = []
        for _, values in sorted(self.per_second.items()):
            values.sort()
            result.append(values[min(int(len(values) * 0.99), len(values) - 1)] / 1000)
        return result

    def stall(self) -> str:
        """The worst ack, when it happened, and the slow acks in and after the first second."""
        if not self.acks:
            return "no acks"
        worst_ns, worst_us = max(self.acks, key=lambda a: a[1])
        first = sum(
            1 for t, us in self.acks if us > SLOW_ACK_MS * 1000 and t - self.started_ns < 1e9
        )
        later = sum(
            1 for t, us in self.acks if us > SLOW_ACK_MS * 1000 and t - self.started_ns >= 1e9
        )
        at_s = (worst_ns - self.started_ns) / 1e9
        return (
            f"worst ack {worst_us / 1000:.1f} ms at t={at_s:.2f}s; acks > {SLOW_ACK_MS:.0f} ms: "
            f"{first} in the first second, {later} after"
        )


@dataclass
class Bench:
    bootstrap: str
    admin: AIOKafkaAdminClient
    args: argparse.Namespace
    topics: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    js: Any = None  # a JetStream context with --transport nats
    streams: list[str] = field(default_factory=list)

    async def new_stream(self) -> tuple[str, str]:
        """A fresh stream (file storage, R1, as `topics ensure` provisions one); returns
        (stream, subject prefix)."""
        name = f"BENCH_{uuid.uuid4().hex[:10].upper()}"
        config = StreamConfig(
            name=name,
            subjects=[f"{name.lower()}.>"],
            storage=StorageType.FILE,
            allow_msg_schedules=True,
        )
        await self.js.add_stream(config)
        self.streams.append(name)
        return name, name.lower()

    async def acked(self, stream: str, consumer: str) -> int:
        """The NATS counterpart of committed offsets: the stream sequence below which
        everything was acknowledged, once nothing is pending (acks land asynchronously)."""
        deadline = time.monotonic() + 10
        while True:
            info = await self.js.consumer_info(stream, consumer)
            if (info.num_pending == 0 and info.num_ack_pending == 0) or (
                time.monotonic() > deadline
            ):
                return int(info.ack_floor.stream_seq or 0)
            await asyncio.sleep(0.05)

    async def new_topic(self) -> str:
        """A fresh topic plus the retry and dead-letter topics a worker of it expects, with
        every partition's leader elected before it is used (as `topics ensure` waits)."""
        name = f"bench-{uuid.uuid4().hex[:12]}"
        settings = worker_settings(self, name, "")
        needed = [name, *settings.retry.failure_topics(main_destinations(stamp_app(), settings))]
        await self.admin.create_topics(
            [NewTopic(t, self.args.partitions, replication_factor=1) for t in needed]
        )
        self.topics.extend(needed)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            described = await self.admin.describe_topics([name])
            parts = described[0]["partitions"] if described else []
            if len(parts) == self.args.partitions and all(p["leader"] >= 0 for p in parts):
                break
            await asyncio.sleep(0.05)
        return name

    async def probe(self, topic: str, recorder: Recorder) -> None:
        """One acknowledged record per partition before the load. A topic this young
        answers its first produce with NOT_LEADER_FOR_PARTITION even after its leaders show
        in the metadata, and aiokafka retries after `retry_backoff_ms` (100 ms): without
        the probe every contestant's first second carries that 100-140 ms stall, an
        artefact of creating the topic for the run (a production topic is older)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        sender_log = logging.getLogger("aiokafka.producer.sender")  # its retry warning
        level = sender_log.level
        sender_log.setLevel(logging.ERROR)
        try:
            for partition in range(self.args.partitions):
                recorder.probes += 1
                message = encode(BenchStamp(seq=-1 - partition, t_ns=0), source="/bench")
                key, headers = to_kafka(message.attributes)
                await producer.send_and_wait(
                    topic, message.body, key=key, headers=headers, partition=partition
                )
        finally:
            sender_log.setLevel(level)
            await producer.stop()

    async def committed(self, group: str) -> int:
        offsets = await self.admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values())

    def check(self, label: str, recorder: Recorder, committed: int) -> None:
        n = recorder.target
        problems = []
        if len(recorder.seen) != n:
            problems.append(f"{len(recorder.seen)} distinct jobs handled, expected {n}")
        if recorder.handled != len(recorder.seen):
            problems.append(f"{recorder.handled - len(recorder.seen)} duplicates")
        if committed != n + recorder.probes:
            expected = f"{n} + {recorder.probes} probes" if recorder.probes else str(n)
            problems.append(f"committed offsets sum to {committed}, expected {expected}")
        if recorder.failed_publishes:
            problems.append(f"{recorder.failed_publishes} publishes failed")
        self.problems.extend(f"{label}: {p}" for p in problems)


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.005)


async def pace(recorder: Recorder, rate: float, publish: Callable[[int, int], object]) -> None:
    """Call `publish(seq, t_ns)` `rate` times a second for the recorder's N jobs, each on its
    due time (at once when late)."""
    n = recorder.target
    start = time.perf_counter_ns()
    recorder.started_ns = start
    recorder.cpu_s = -time.process_time()
    interval_ns = 1e9 / rate
    for seq in range(n):
        due = start + int(seq * interval_ns)
        now = time.perf_counter_ns()
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
            now = time.perf_counter_ns()
        recorder.pacer_late_ns = max(recorder.pacer_late_ns, now - due)
        publish(seq, now)


# -- the contestants ------------------------------------------------------------------------


def bare_publish(
    producer: AIOKafkaProducer, topic: str, recorder: Recorder, *, as_job: bool
) -> Callable[[int, int], None]:
    """`publish(seq, t_ns)` through a bare producer: a JSON body alone, or (`as_job`) the
    whole jobstream record (`encode` + `to_kafka`), for a jobstream worker to read."""

    def publish(seq: int, t_ns: int) -> None:
        if as_job:
            message = encode(BenchStamp(seq=seq, t_ns=t_ns), source="/bench", key=f"k{seq % 1000}")
            key, headers = to_kafka(message.attributes)
            sending = producer.send(topic, message.body, key=key, headers=headers)
        else:
            value = json.dumps({"seq": seq, "t_ns": t_ns}).encode()
            sending = producer.send(topic, value, key=f"k{seq % 1000}".encode())

        def sent(task: asyncio.Future[Any]) -> None:
            if task.exception() is not None:
                recorder.failed_publishes += 1
            else:
                task.result().add_done_callback(acked)

        def acked(future: asyncio.Future[Any]) -> None:
            if future.exception() is None:
                recorder.acked(seq, t_ns)
            else:
                recorder.failed_publishes += 1

        asyncio.ensure_future(sending).add_done_callback(sent)

    return publish


async def run_bare(bench: Bench, recorder: Recorder, linger_ms: int) -> int:
    """Bare aiokafka producer and consumer; returns the group's committed offsets."""
    topic = await bench.new_topic()
    await bench.probe(topic, recorder)
    group = f"bench-bare-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bench.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bench.bootstrap, acks="all", enable_idempotence=True, linger_ms=linger_ms
    )
    await consumer.start()
    await producer.start()
    stopping = asyncio.Event()

    async def consume() -> None:
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    body = json.loads(record.value)
                    recorder.handle(body["seq"], body["t_ns"])

    async def commit() -> None:
        while not stopping.is_set():
            await asyncio.sleep(0.2)
            await consumer.commit()

    publish = bare_publish(producer, topic, recorder, as_job=False)
    tasks = [asyncio.create_task(consume()), asyncio.create_task(commit())]
    try:
        await _until(lambda: bool(consumer.assignment()), "the bare consumer's assignment")
        await pace(recorder, bench.args.rate, publish)
        await producer.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await recorder.done.wait()
    finally:
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await consumer.commit()
        await producer.stop()
        await consumer.stop()
    return await bench.committed(group)


def worker_settings(bench: Bench, topic: str, group: str, **worker: object) -> Settings:
    """Defaults, except: this Kafka, `bench.stamp` routed to `topic`, the memory store."""
    return Settings(
        kafka={"bootstrap_servers": bench.bootstrap},
        routing={"routes": {BenchStamp.job_type: topic}},
        worker={"group": group, **worker},
        idempotency={"backend": "memory"},
    )


def stamp_app(recorder: Recorder | None = None) -> App:
    app = App("bench")

    @app.handler(BenchStamp)
    async def stamp(job: BenchStamp, ctx: JobContext) -> None:
        if recorder is not None:
            recorder.handle(job.seq, job.t_ns)

    return app


@contextlib.contextmanager
def job_logs(level: int) -> Iterator[None]:
    """The production log setup (one JSON line per job at INFO), written to /dev/null."""
    root = logging.getLogger("jobstream")
    saved = (root.handlers[:], root.level, root.propagate)
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(level)
        root.propagate = False
        try:
            yield
        finally:
            root.handlers[:], saved_level, root.propagate = saved
            root.setLevel(saved_level)


@dataclass(frozen=True)
class Variant:
    """A jobstream contestant's settings: `--variant linger=0,logs=info,warm=yes,flight=64`;
    `producer=bare` publishes through a bare aiokafka producer (the worker side alone)."""

    linger_ms: int | None = None  # None: the producer's default
    log_level: int = logging.INFO
    warm_up: bool = False  # one publish before the load (the topic's metadata checked once)
    max_in_flight: int | None = None  # None: the worker's default
    bare_producer: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        fields = dict(item.split("=", 1) for item in text.split(",") if item)
        return cls(
            linger_ms=int(fields["linger"]) if "linger" in fields else None,
            log_level=getattr(logging, fields.get("logs", "info").upper()),
            warm_up=fields.get("warm", "no") in ("yes", "1", "true"),
            max_in_flight=int(fields["flight"]) if "flight" in fields else None,
            bare_producer=fields.get("producer") == "bare",
        )


DEFAULTS = Variant()
TUNED = Variant(linger_ms=0, log_level=logging.WARNING, warm_up=True)


async def run_jobstream(bench: Bench, recorder: Recorder, variant: Variant) -> int:
    """`JobProducer` + `Worker` with `variant`'s settings; returns committed offsets."""
    topic = await bench.new_topic()
    await bench.probe(topic, recorder)
    group = f"bench-js-{uuid.uuid4().hex[:8]}"
    worker_fields = (
        {} if variant.max_in_flight is None else {"max_in_flight": variant.max_in_flight}
    )
    settings = worker_settings(bench, topic, group, **worker_fields)
    kafka: dict[str, object] = {"bootstrap_servers": bench.bootstrap}
    if variant.linger_ms is not None:
        kafka["linger_ms"] = variant.linger_ms
    producer_settings = ProducerSettings(
        kafka=kafka, routing={"routes": {BenchStamp.job_type: topic}}
    )
    worker = Worker(stamp_app(recorder), settings, KafkaSource(settings, [topic]))
    with job_logs(variant.log_level):
        runner = asyncio.create_task(worker.run(), name="bench-worker")
        try:
            if variant.bare_producer:
                linger = 0 if variant.linger_ms is None else variant.linger_ms
                bare = AIOKafkaProducer(
                    bootstrap_servers=bench.bootstrap,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=linger,
                )
                await bare.start()
                try:
                    await _until(lambda: worker.ready or runner.done(), "the worker's assignment")
                    publish_bare = bare_publish(bare, topic, recorder, as_job=True)
                    await pace(recorder, bench.args.rate, publish_bare)
                    await bare.flush()
                finally:
                    await bare.stop()
            else:
                await publish_through_jobstream(
                    bench, recorder, variant, producer_settings, worker, runner
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    await asyncio.wait(
                        [runner, asyncio.ensure_future(recorder.done.wait())],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
        finally:
            worker.stop()
            await runner
    return await bench.committed(group)


async def publish_through_jobstream(
    bench: Bench,
    recorder: Recorder,
    variant: Variant,
    producer_settings: ProducerSettings,
    worker: Worker,
    runner: asyncio.Task[None],
) -> None:
    """The paced load through `JobProducer.publish()`, one task per job."""
    pending: set[asyncio.Task[None]] = set()
    async with JobProducer(producer_settings) as producer:
        await _until(lambda: worker.ready or runner.done(), "the worker's assignment")
        if runner.done():
            await runner
        if variant.warm_up:
            # A warm-up publish: the producer checks the topic's metadata once, not
            # once per publish that starts before the first check has returned.
            recorder.probes += 1
            await producer.publish(BenchStamp(seq=-1000, t_ns=0))

        async def publish_one(seq: int, t_ns: int) -> None:
            try:
                await producer.publish(BenchStamp(seq=seq, t_ns=t_ns), key=f"k{seq % 1000}")
            except Exception:  # noqa: BLE001 - counted and reported as a failure
                recorder.failed_publishes += 1
            else:
                recorder.acked(seq, t_ns)

        def publish(seq: int, t_ns: int) -> None:
            task = asyncio.create_task(publish_one(seq, t_ns))
            pending.add(task)
            task.add_done_callback(pending.discard)

        await pace(recorder, bench.args.rate, publish)
        await asyncio.gather(*pending)


async def run_bare_nats(bench: Bench, recorder: Recorder) -> int:
    """nats-py `publish_async` (the PubAck is the ack) and a pull consumer, `fetch(256)` and
    `ack()` per message; returns the acknowledged stream sequence."""
    stream, prefix = await bench.new_stream()
    subject = f"{prefix}.bench.stamp"
    name = f"bare-{uuid.uuid4().hex[:8]}"
    config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000)
    await bench.js.add_consumer(stream, config)
    client = await nats.connect(bench.args.nats_url)
    js = client.jetstream()
    subscription = await js.pull_subscribe_bind(name, stream=stream)
    stopping = asyncio.Event()

    async def consume() -> None:
        while not stopping.is_set():
            try:
                messages = await subscription.fetch(256, timeout=0.1)
            except nats.errors.TimeoutError:
                continue
            for message in messages:
                body = json.loads(message.data)
                recorder.handle(body["seq"], body["t_ns"])
                await message.ack()

    def publish(seq: int, t_ns: int) -> None:
        value = json.dumps({"seq": seq, "t_ns": t_ns}).encode()

        def sent(task: asyncio.Future[Any]) -> None:
            if task.exception() is not None:
                recorder.failed_publishes += 1
            else:
                task.result().add_done_callback(acked)

        def acked(future: asyncio.Future[Any]) -> None:
            if future.exception() is None:
                recorder.acked(seq, t_ns)
            else:
                recorder.failed_publishes += 1

        asyncio.ensure_future(js.publish_async(subject, value)).add_done_callback(sent)

    consumer = asyncio.create_task(consume())
    try:
        await pace(recorder, bench.args.rate, publish)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await recorder.done.wait()
    finally:
        stopping.set()
        await asyncio.gather(consumer, return_exceptions=True)
        await client.flush()
        await client.close()
    return await bench.acked(stream, name)


async def run_jobstream_nats(bench: Bench, recorder: Recorder, log_level: int) -> int:
    """`JobProducer` + `Worker` + `NatsSource` with the defaults (confirmed acks, 64 in
    flight); returns the acknowledged stream sequence."""
    stream, prefix = await bench.new_stream()
    group = f"js-{uuid.uuid4().hex[:8]}"
    routing = {"stream": stream, "subject_prefix": f"{prefix}."}
    settings = Settings(
        transport="nats",
        nats={"servers": [bench.args.nats_url]},
        routing=routing,
        worker={"group": group},
        idempotency={"backend": "memory"},
    )
    producer_settings = ProducerSettings(
        transport="nats", nats={"servers": [bench.args.nats_url]}, routing=routing
    )
    source = NatsSource(settings, [f"{prefix}.bench.stamp"])
    worker = Worker(stamp_app(recorder), settings, source)
    variant = Variant(log_level=log_level)
    with job_logs(log_level):
        runner = asyncio.create_task(worker.run(), name="bench-worker")
        try:
            await publish_through_jobstream(
                bench, recorder, variant, producer_settings, worker, runner
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    await asyncio.wait(
                        [runner, asyncio.ensure_future(recorder.done.wait())],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
        finally:
            worker.stop()
            await runner
    consumers = source.consumers
    return await bench.acked(stream, consumers[0]) if consumers else -1


NATS_CONTESTANTS: dict[str, Callable[[Bench, Recorder], Awaitable[int]]] = {
    "bare nats": run_bare_nats,
    "jobstream nats defaults": lambda b, r: run_jobstream_nats(b, r, logging.INFO),
    "jobstream nats quiet logs": lambda b, r: run_jobstream_nats(b, r, logging.WARNING),
}


CONTESTANTS: dict[str, Callable[[Bench, Recorder], Awaitable[int]]] = {
    "bare linger 0": lambda b, r: run_bare(b, r, 0),
    "bare linger 5": lambda b, r: run_bare(b, r, 5),
    "jobstream defaults": lambda b, r: run_jobstream(b, r, DEFAULTS),
    "jobstream tuned": lambda b, r: run_jobstream(b, r, TUNED),
}


def ms(histogram: HdrHistogram, percentile: float | None = None) -> str:
    micros = (
        histogram.get_max_value()
        if percentile is None
        else histogram.get_value_at_percentile(percentile)
    )
    return f"{micros / 1000:.2f}"


def table(title: str, results: dict[str, list[Recorder]], pick: str) -> None:
    print(
        f"\n   {title} (ms; the repeats' histograms merged; s-p99: the p99 of each second of "
        "load, median and worst; p99 of each run; CPU of this process per job)"
    )
    heads = " ".join(f"{'p' + format(p, 'g'):>7}" for p in PERCENTILES)
    seconds = f"{'s-p99 md':>8} {'s-p99 max':>9}"
    print(f"   {'contestant':<28} {heads} {'max':>7}  {seconds}  {'CPU-us/job':>10}   p99 per run")
    for name, recorders in results.items():
        merged = HdrHistogram(1, 60_000_000, 3)
        for recorder in recorders:
            merged.add(getattr(recorder, pick))
        cells = " ".join(f"{ms(merged, p):>7}" for p in PERCENTILES)
        cpu = statistics.median(r.cpu_s / r.target * 1e6 for r in recorders)
        each = ", ".join(ms(getattr(r, pick), 99) for r in recorders)
        if pick == "e2e":
            p99s = [p for r in recorders for p in r.second_p99s()]
            by_second = f"{statistics.median(p99s):>8.2f} {max(p99s):>9.2f}"
        else:
            by_second = f"{'':>8} {'':>9}"
        print(f"   {name:<28} {cells} {ms(merged):>7}  {by_second}  {cpu:>10.0f}   {each}")


async def main(args: argparse.Namespace) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
        await admin.close()
        print(f"error: Kafka is not reachable at {args.bootstrap} ({error!r}): run `make up`")
        return 2
    bench = Bench(args.bootstrap, admin, args)
    names = args.contestants
    if names is None:
        names = [*(CONTESTANTS if args.transport in ("kafka", "both") else ())]
        names += [*(NATS_CONTESTANTS if args.transport in ("nats", "both") else ())]
    client = None
    if any(name in NATS_CONTESTANTS for name in names):
        try:
            client = await nats.connect(args.nats_url, connect_timeout=3, max_reconnect_attempts=0)
        except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback
            await admin.close()
            print(f"error: NATS is not reachable at {args.nats_url} ({error!r}): run `make up`")
            return 2
        bench.js = client.jetstream()
    n = int(args.rate * args.seconds)
    print(
        f"bench_latency: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, Kafka at {args.bootstrap}; {args.rate:,.0f} jobs/s for "
        f"{args.seconds:g}s ({n:,} jobs) per contestant, {args.partitions} partitions, "
        f"{args.repeats} repeat(s), interleaved"
    )
    results: dict[str, list[Recorder]] = collections.defaultdict(list)
    started = time.perf_counter()
    try:
        for _ in range(args.repeats):
            for name in [*names, *args.variant]:
                recorder = Recorder(target=n)
                if name in CONTESTANTS:
                    committed = await CONTESTANTS[name](bench, recorder)
                elif name in NATS_CONTESTANTS:
                    committed = await NATS_CONTESTANTS[name](bench, recorder)
                else:
                    committed = await run_jobstream(bench, recorder, Variant.parse(name))
                bench.check(name, recorder, committed)
                results[name].append(recorder)
                print(
                    f"   {name:<28} p99 {ms(recorder.e2e, 99)} ms to handler, "
                    f"ack p99 {ms(recorder.ack, 99)} ms; "
                    f"CPU {recorder.cpu_s / n * 1e6:.0f} us/job; "
                    f"pacer late up to {recorder.pacer_late_ns / 1e6:.1f} ms; {recorder.stall()}; "
                    f"{recorder.after_ack()}"
                )
    finally:
        if bench.topics:
            await admin.delete_topics(bench.topics)
        await admin.close()
        if client is not None:
            for stream in bench.streams:
                await bench.js.delete_stream(stream)
            await client.close()
    table("publish to handler", results, "e2e")
    table("publish acknowledgement", results, "ack")
    best = {
        name: max(r.e2e.get_value_at_percentile(99) for r in rs) / 1000
        for name, rs in results.items()
    }
    for name, worst in best.items():
        if not name.startswith("bare"):
            verdict = "meets" if worst <= 10 else "misses"
            print(f"   {name}: worst p99 of the repeats {worst:.1f} ms ({verdict} <= 10 ms)")
    print(f"\ntotal {time.perf_counter() - started:.0f}s, load average {os.getloadavg()[0]:.2f}")
    for problem in bench.problems:
        print(f"FAILED {problem}")
    return 1 if bench.problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--bootstrap", default=os.environ.get("JOBSTREAM_TEST_KAFKA", "127.0.0.1:9092")
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="jobs per second (1,000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load duration (30)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (1)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic (4)")
    parser.add_argument(
        "--contestants",
        nargs="*",
        choices=[*CONTESTANTS, *NATS_CONTESTANTS],
        help="default: every contestant of --transport",
    )
    parser.add_argument(
        "--transport",
        choices=["kafka", "nats", "both"],
        default="both",
        help="kafka, nats, or both (default)",
    )
    parser.add_argument(
        "--nats-url", default=os.environ.get("JOBSTREAM_TEST_NATS", "nats://127.0.0.1:4222")
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SETTINGS",
        help="an extra jobstream contestant, e.g. linger=0,logs=info,warm=yes,flight=64",
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
