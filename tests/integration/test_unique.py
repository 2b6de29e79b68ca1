"""Unique jobs on the real stores (Redis, PostgreSQL, NATS KV) and brokers (Kafka, NATS):
100 concurrent publishes of one unique key from 4 processes (25 each) store ONE job,
counted by job id on the topic or stream; a publish after the window stores a second; a
store that goes away fails a publish with `UniqueStoreUnavailable` and nothing is stored,
and the next publish works once it is back (a TCP proxy of the test's own is cut and
restored: the shared services are never stopped).

The child processes run this module: `python -m tests.integration.test_unique <config>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import psycopg
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from nats.js.errors import NotFoundError
from psycopg import sql

from producer import JobProducer, ProducerSettings, UniqueStoreUnavailable
from producer._unique_postgres import PostgresUniqueStore
from producer.memory import MemoryBroker, MemoryPublisher
from schemas import from_kafka, from_nats
from schemas.examples import GenerateReport
from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL, POSTGRES_DSN, REDIS_URL
from tests.support import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

JOB = GenerateReport(account_id="a", month="2025-01")
STORE_URLS = {"redis": REDIS_URL, "postgres": POSTGRES_DSN, "nats": NATS_URL}
PROCESSES, CONCURRENCY = 4, 25


@pytest.fixture(params=sorted(STORE_URLS))
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def namespace(store: str) -> AsyncIterator[str]:
    """A namespace of this test's own in the store; its table, bucket or keys go after."""
    name = f"u{uuid.uuid4().hex[:10]}"
    yield name
    if store == "postgres":
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            table = sql.Identifier(f"{name}_unique")
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
    elif store == "nats":
        client = await nats.connect(NATS_URL)
        with contextlib.suppress(NotFoundError):
            await client.jetstream().delete_key_value(f"{name}_unique")
        await client.close()
    else:
        client = redis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(f"{name}:unique:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


Destination = tuple[dict[str, Any], Callable[[], Awaitable[list[str]]]]


@pytest.fixture(params=["kafka", "nats"])
async def destination(
    request: pytest.FixtureRequest, new_topic: Any, new_stream: Any
) -> Destination:
    """(settings of a producer publishing jobs of JOB's type there, the ids stored there)."""
    if request.param == "kafka":
        topic = await new_topic(1)
        config = {
            "transport": "kafka",
            "kafka": {"bootstrap_servers": KAFKA_BOOTSTRAP},
            "routing": {"routes": {JOB.job_type: topic}},
        }
        return config, lambda: kafka_job_ids(topic)
    stream, prefix = await new_stream()
    config = {
        "transport": "nats",
        "nats": {"servers": [NATS_URL]},
        "routing": {"routes": {JOB.job_type: f"{prefix}.report"}},
    }
    return config, lambda: nats_job_ids(stream)


async def kafka_job_ids(topic: str) -> list[str]:
    """The job id of every record of the (one-partition) topic, repeats included."""
    partition = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    ids: list[str] = []
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        async with asyncio.timeout(30):
            while await consumer.position(partition) < end:
                batches = await consumer.getmany(partition, timeout_ms=1000)
                ids += [from_kafka(r.key, r.headers).id for r in batches.get(partition, [])]
    finally:
        await consumer.stop()
    return ids


async def nats_job_ids(stream: str) -> list[str]:
    """The job id of every message of the stream, repeats included."""
    client = await nats.connect(NATS_URL)
    js = client.jetstream()
    try:
        state = (await js.stream_info(stream)).state
        ids = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            ids.append(from_nats((await js.get_msg(stream, seq)).headers).id)
    finally:
        await client.close()
    return ids


def unique_settings(store: str, namespace: str, **extra: object) -> dict[str, object]:
    return {"url": STORE_URLS[store], "namespace": namespace, **extra}


def spawn(config: dict[str, Any], key: str) -> subprocess.Popen[str]:
    """A child process running `_child` (this module as a script)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_unique", json.dumps([config, key])],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_100_concurrent_publishes_from_4_processes_store_one_job(
    store: str, namespace: str, destination: Destination
) -> None:
    config, stored_ids = destination
    config = {**config, "unique": unique_settings(store, namespace)}
    key = f"report-{uuid.uuid4().hex}"
    children = [await asyncio.to_thread(spawn, config, key) for _ in range(PROCESSES)]
    try:
        for child in children:  # every producer connected: then all start at once
            assert child.stdout is not None
            assert await asyncio.to_thread(child.stdout.readline) == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [await asyncio.to_thread(child.communicate, timeout=120) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0] * PROCESSES
    receipts = [tuple(r) for out, _ in outputs for r in json.loads(out)]
    assert len(receipts) == PROCESSES * CONCURRENCY
    ids = await stored_ids()
    assert len(set(ids)) == 1, f"{len(set(ids))} jobs stored for one unique key"
    assert {job_id for job_id, _ in receipts} == set(ids)
    assert sum(not duplicate for _, duplicate in receipts) == 1


async def test_a_publish_after_the_window_stores_a_second_job(
    store: str, namespace: str, destination: Destination
) -> None:
    config, stored_ids = destination
    config = {**config, "unique": unique_settings(store, namespace)}
    key = f"report-{uuid.uuid4().hex}"
    async with JobProducer(ProducerSettings.model_validate(config)) as producer:
        first = await producer.publish(JOB, unique_key=key, unique_for=2.0)
        window_over = time.time() + 2.0  # the window started before `first` returned
        inside = await producer.publish(JOB, unique_key=key, unique_for=2.0)
        assert (inside.job_id, inside.duplicate) == (first.job_id, True)
        await asyncio.sleep(max(window_over - time.time(), 0) + 0.05)
        second = await producer.publish(JOB, unique_key=key, unique_for=2.0)
    assert not second.duplicate
    assert second.job_id != first.job_id
    assert sorted(await stored_ids()) == sorted([first.job_id, second.job_id])


class Proxy:
    """A TCP proxy of the test's own in front of a shared service, cut and restored."""

    def __init__(self, upstream_port: int) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones (the service went away)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def through(store: str, port: int) -> str:
    """The store's URL with its port replaced by the proxy's."""
    url = STORE_URLS[store]
    upstream = url.rsplit(":", 1)[1].split("/", 1)
    return url.replace(f":{upstream[0]}", f":{port}", 1)


async def test_a_store_that_goes_away_fails_the_publish_clearly_then_recovers(
    store: str, namespace: str
) -> None:
    upstream = int(STORE_URLS[store].rsplit(":", 1)[1].split("/", 1)[0])
    proxy = Proxy(upstream)
    await proxy.start()
    broker = MemoryBroker()
    broker.create_topic("jobs.report.generate", 1)
    unique = {"url": through(store, proxy.port), "namespace": namespace, "timeout_s": 2.0}
    config = ProducerSettings(transport="memory", unique=unique)
    async with JobProducer(config, publisher=MemoryPublisher(broker)) as producer:
        before = await producer.publish(JOB, unique_key="k1", unique_for=60)
        await proxy.cut()
        started = time.monotonic()
        with pytest.raises(UniqueStoreUnavailable) as failed:
            await producer.publish(JOB, unique_key="k2", unique_for=60)
        assert time.monotonic() - started < 10  # bounded by unique.timeout_s per call
        assert failed.value.retriable
        assert "JOBSTREAM_UNIQUE__URL" in str(failed.value)
        assert f"127.0.0.1:{proxy.port}" in str(failed.value)
        assert broker.end_offset("jobs.report.generate", 0) == 1  # nothing was published
        await proxy.start()  # back (as after a restart): the next publishes work

        async def publish_again() -> Any:
            for _ in range(60):
                with contextlib.suppress(UniqueStoreUnavailable):
                    return await producer.publish(JOB, unique_key="k2", unique_for=60)
                await asyncio.sleep(0.5)
            pytest.fail("the store did not come back through the proxy")

        after = await publish_again()
        again = await producer.publish(JOB, unique_key="k1", unique_for=60)
    await proxy.cut()
    assert not after.duplicate
    assert (again.job_id, again.duplicate) == (before.job_id, True)
    assert broker.end_offset("jobs.report.generate", 0) == 2


async def _child(config: dict[str, Any], key: str) -> None:
    """One of the 4 processes: connect, say ready, wait for go, publish 25 at once."""
    async with JobProducer(ProducerSettings.model_validate(config)) as producer:
        print("ready", flush=True)
        assert (await asyncio.to_thread(sys.stdin.readline)) == "go\n"
        receipts = await asyncio.gather(
            *(producer.publish(JOB, unique_key=key, unique_for=60) for _ in range(CONCURRENCY))
        )
    print(json.dumps([[r.job_id, r.duplicate] for r in receipts]), flush=True)


if __name__ == "__main__":
    config, key = json.loads(sys.argv[1])
    asyncio.run(_child(config, key))


@pytest.mark.parametrize("store", ["postgres"])
async def test_many_producers_creating_the_postgres_table_at_once_all_succeed(
    namespace: str,
) -> None:
    """`CREATE TABLE IF NOT EXISTS` races: two sessions creating one table at the same
    moment fail on its row type (DuplicateObject). 16 producers using a new namespace at
    once (as 4 processes starting together did, once in a full run) must all go on."""
    stores = [PostgresUniqueStore(POSTGRES_DSN, namespace, 5.0) for _ in range(16)]
    try:
        found = await asyncio.gather(*(s.get(f"k{i}") for i, s in enumerate(stores)))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert found == [None] * 16
