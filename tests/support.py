"""Helpers for tests that run workers against the real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from consumer import App, Settings, Worker, open_worker
from schemas import Job, encode, to_kafka, to_nats
from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SinkLine:
    job_id: str
    key: str
    seq: int
    pid: int
    attempt: int
    start: float
    end: float
    outcome: str


def read_sink(path: Path, outcome: str | None = "done") -> list[SinkLine]:
    """The sink's lines, by default only those of completed runs."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        if outcome is not None and not raw.endswith(f" {outcome}"):
            continue
        f = raw.split()
        lines.append(
            SinkLine(f[0], f[1], int(f[2]), int(f[3]), int(f[4]), float(f[5]), float(f[6]), f[7])
        )
    return lines


async def publish_raw(
    topic: str, jobs: Iterable[tuple[str | None, Job]], *, ids: Sequence[str] | None = None
) -> list[str]:
    """Publish with a plain aiokafka producer (the wire contract, nothing of ours)."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA_BOOTSTRAP, acks="all", linger_ms=5)
    await producer.start()
    published: list[str] = []
    try:
        futures = []
        for index, (key, job) in enumerate(jobs):
            message = encode(job, source="/tests", key=key, id=ids[index] if ids else None)
            record_key, headers = to_kafka(message.attributes)
            futures.append(
                await producer.send(topic, message.body, key=record_key, headers=headers)
            )
            published.append(message.attributes.id)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return published


@contextlib.asynccontextmanager
async def running_worker(app: App, settings: Settings) -> AsyncIterator[Worker]:
    """An in-process worker, wired like `jobstream worker` (routing, status), running
    until the block ends, then drained."""
    async with open_worker(app, settings) as worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await task


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def routed_topic(new_topic: Callable[..., Awaitable[str]], partitions: int = 3) -> str:
    """A fresh main topic with the two retry tiers (`TEST_TIERS_S`) and the dead-letter
    topic a worker needs."""
    topic = await new_topic(partitions=partitions)
    for suffix in (".retry.1", ".retry.2", ".dlq"):
        await new_topic(partitions=partitions, name=topic + suffix)
    return topic


TEST_TIERS_S = "[0.5, 2.0]"


def worker_env(topic: str, group: str, sink: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
        "JOBSTREAM_ROUTING__ROUTES": json.dumps({"test.record": topic}),
        "JOBSTREAM_WORKER__GROUP": group,
        "JOBSTREAM_RETRY__TIERS_S": TEST_TIERS_S,
        "JOBSTREAM_HEALTH__PORT": "0",
        "JOBSTREAM_TEST_SINK": str(sink),
        "JOBSTREAM_LOGGING__LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    env.update(extra)
    return env


async def caught_up(admin: AIOKafkaAdminClient, group: str, topics: Sequence[str]) -> bool:
    """True when `group` has committed every partition of `topics` up to its end."""
    described = await admin.describe_topics(list(topics))
    partitions = [
        TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]
    ]
    assert len({tp.topic for tp in partitions}) == len(topics), f"unknown topic in {topics}"
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    committed = await admin.list_consumer_group_offsets(group)
    return all(
        end == 0 or (tp in committed and committed[tp].offset >= end) for tp, end in ends.items()
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


async def start_ready_workers(
    env: dict[str, str], logs: Path, count: int, app: str = "tests.apps.recorder:app"
) -> list[subprocess.Popen[bytes]]:
    """Start `count` workers of `app` and wait until every one has joined the group
    (/readyz)."""
    ports = [free_port() for _ in range(count)]
    workers = [
        start_worker({**env, "JOBSTREAM_HEALTH__PORT": str(port)}, logs / f"worker-{i}.log", app)
        for i, port in enumerate(ports)
    ]
    await wait_until(
        lambda: all(http_status(port, "/readyz") == 200 for port in ports), 60, "workers ready"
    )
    return workers


def start_worker(
    env: dict[str, str], log: Path, app: str = "tests.apps.recorder:app"
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobstream", "worker", app],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def stop_worker(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 60
) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout_s)


# -- NATS JetStream ---------------------------------------------------------------------


def fnv1a_partition(key: str, partitions: int) -> int:
    """The key partition of docs/nats.md, written out again so that tests check the
    producer's and the worker's copy against the documented contract."""
    value = 0x811C9DC5
    for byte in key.encode():
        value = ((value ^ byte) * 0x01000193) % 2**32
    return value % partitions


def nats_env(stream: str, prefix: str, **extra: str) -> dict[str, str]:
    """Worker settings for a stream capturing `<prefix>.>` on the test NATS server."""
    return {
        "JOBSTREAM_TRANSPORT": "nats",
        "JOBSTREAM_NATS__SERVERS": json.dumps([NATS_URL]),
        "JOBSTREAM_ROUTING__STREAM": stream,
        "JOBSTREAM_ROUTING__SUBJECT_PREFIX": f"{prefix}.",
        **extra,
    }


async def publish_nats(
    subject: str,
    jobs: Iterable[tuple[str | None, Job]],
    *,
    partitions: int = 0,
    ids: Sequence[str] | None = None,
    url: str = NATS_URL,
) -> list[str]:
    """Publish with plain nats-py (the wire contract, nothing of ours); with `partitions`,
    to `<subject>.<fnv1a(key or id) % partitions>`."""
    client = await nats.connect(url)
    js = client.jetstream()
    published: list[str] = []
    try:
        pending: list[asyncio.Future[object]] = []
        for index, (key, job) in enumerate(jobs):
            message = encode(job, source="/tests", key=key, id=ids[index] if ids else None)
            target = subject
            if partitions:
                target = f"{subject}.{fnv1a_partition(key or message.attributes.id, partitions)}"
            headers = to_nats(message.attributes)
            pending.append(await js.publish_async(target, message.body, headers=headers))
            published.append(message.attributes.id)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await client.close()
    return published


async def wait_nats_consumer_settled(
    url: str, stream: str, consumer: str, timeout_s: float
) -> None:
    """Wait until the JetStream `consumer` has nothing pending and nothing unacknowledged."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()

        async def settled() -> bool:
            info = await js.consumer_info(stream, consumer)
            return info.num_pending == 0 and info.num_ack_pending == 0

        deadline = time.monotonic() + timeout_s
        while not await settled():
            if time.monotonic() > deadline:
                raise AssertionError("the consumer still has unacknowledged jobs")
            await asyncio.sleep(0.2)
    finally:
        await client.close()
