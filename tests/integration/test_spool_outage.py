"""The spool through a real outage: a broker of the test's own is down for 30 s while
5,000 jobs are published from the SDK (50 keys, a per-key sequence number in each payload)
and 500 through the HTTP ingress (10 keys). Once the broker is back, every job id is in
the topic / stream, per-key order holds (the first occurrence of each key's numbers
increases) and both spools are empty.

NATS: every id exactly once (JetStream drops a repeated `Nats-Msg-Id` within its duplicate
window, 120 s, longer than the outage). Kafka: the idempotent producer does not dedupe a
resend from the spool (a new batch), so a publish that timed out although the broker had
stored it appears twice, with the same job id: the test counts such repeats, checks that
the first occurrences are in key order, and runs a worker over the topic: its idempotency
step skips the repeats, so each job runs once. The counts are printed (`-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import Settings, backend_for
from consumer.stores import open_status
from jobstream._ingress import create_app
from producer import JobProducer, Receipt, read_spool_status
from tests.apps.recorder import RecordJob, app
from tests.conftest import REDIS_URL
from tests.own_services import OwnServer, PrivateKafka
from tests.support import read_sink, running_worker, wait_until

pytestmark = pytest.mark.integration

SDK_KEYS, SDK_PER_KEY = 50, 100  # 5,000 jobs
HTTP_KEYS, HTTP_PER_KEY = 10, 50  # 500 jobs
OUTAGE_S = 30.0
PUBLISHING_S = 40.0  # the jobs are spread over this long, the outage in the middle


Found = list[tuple[str, int, str]]  # (key, n, job id) in the order the broker stores them


TOPIC = "jobs.spool.outage"  # the topic (Kafka) or subject (NATS) of `test.record` here


def spool_settings(tmp_path: Path, name: str, **broker: Any) -> Settings:
    return Settings(
        routing={**broker.pop("routing", {}), "routes": {"test.record": TOPIC}},
        spool={
            "path": tmp_path / f"{name}.db",
            "retry_initial_s": 0.2,
            "retry_max_s": 2.0,
            "stop_drain_s": 30.0,
        },
        status={
            "backend": "redis",
            "url": REDIS_URL,
            "namespace": f"t{uuid.uuid4().hex[:8]}",
        },
        **broker,
    )


async def publish_from_sdk(producer: JobProducer) -> list[Receipt]:
    """5,000 jobs, each key's jobs one after the other, paced over `PUBLISHING_S`."""
    pause = PUBLISHING_S / SDK_PER_KEY

    async def one_key(k: int) -> list[Receipt]:
        key = f"sdk-{k}"
        receipts = []
        for n in range(SDK_PER_KEY):
            receipts.append(await producer.publish(RecordJob(seq=n, key=key), key=key))
            await asyncio.sleep(pause)
        return receipts

    per_key = await asyncio.gather(*(one_key(k) for k in range(SDK_KEYS)))
    return [receipt for receipts in per_key for receipt in receipts]


async def publish_over_http(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    """500 jobs through `POST /v1/jobs/test.record?key=...`: the 202 bodies."""
    pause = PUBLISHING_S / HTTP_PER_KEY

    async def one_key(k: int) -> list[dict[str, Any]]:
        key = f"http-{k}"
        answers = []
        for n in range(HTTP_PER_KEY):
            response = await http.post(
                f"/v1/jobs/test.record?key={key}", json={"key": key, "seq": n}
            )
            assert response.status_code == 202, response.text
            answers.append(response.json())
            await asyncio.sleep(pause)
        return answers

    per_key = await asyncio.gather(*(one_key(k) for k in range(HTTP_KEYS)))
    return [answer for answers in per_key for answer in answers]


@contextlib.asynccontextmanager
async def ingress(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The ingress app with its lifespan run (so its producer is stopped at the end)."""
    status = await open_status(settings)
    assert status is not None
    web = create_app(settings, status)
    try:
        async with web.router.lifespan_context(web):
            transport = httpx.ASGITransport(app=web)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://ingress", timeout=60
            ) as http:
                yield http
    finally:
        await status.close()


async def run_outage(
    settings_sdk: Settings,
    settings_http: Settings,
    stop: Callable[[], Awaitable[None]],
    start: Callable[[], Awaitable[None]],
) -> tuple[list[Receipt], list[dict[str, Any]], dict[str, float]]:
    """Publish from both sides while the broker is down for `OUTAGE_S` in the middle;
    return the receipts, the 202 bodies and the timings (seconds)."""
    timings: dict[str, float] = {}
    began = time.monotonic()

    async def outage() -> None:
        await asyncio.sleep((PUBLISHING_S - OUTAGE_S) / 2)
        await stop()
        timings["down_at_s"] = time.monotonic() - began
        await asyncio.sleep(OUTAGE_S)
        await start()
        timings["up_at_s"] = time.monotonic() - began

    async with JobProducer(settings_sdk) as producer, ingress(settings_http) as http:
        receipts, answers, _ = await asyncio.gather(
            publish_from_sdk(producer), publish_over_http(http), outage()
        )
        timings["published_s"] = time.monotonic() - began
        await wait_until_empty(settings_sdk, settings_http)
        timings["drained_s"] = time.monotonic() - began
    for settings in (settings_sdk, settings_http):
        assert settings.spool.path is not None
        left = read_spool_status(settings.spool.path)
        assert (left.jobs, left.bytes, left.oldest_age_s, left.destinations) == (0, 0, None, {})
        assert (left.refused, left.blocked) == (0, {})  # nothing left, nothing blocked
    return receipts, answers, timings


async def wait_until_empty(*settings: Settings, timeout_s: float = 120) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            jobs = [read_spool_status(s.spool.path).jobs for s in settings if s.spool.path]
            if not any(jobs):
                return
            await asyncio.sleep(0.2)


def check(found: Found, receipts: list[Receipt], answers: list[dict[str, Any]]) -> int:
    """Every id published, per-key order kept; returns how many records were repeats."""
    sent = {r.job_id for r in receipts} | {a["job_id"] for a in answers}
    assert len(sent) == SDK_KEYS * SDK_PER_KEY + HTTP_KEYS * HTTP_PER_KEY
    stored = [job_id for *_, job_id in found]
    assert set(stored) == sent, f"missing: {len(sent - set(stored))}"
    first: dict[str, list[int]] = {}
    seen: set[str] = set()
    for key, n, job_id in found:
        if job_id not in seen:
            seen.add(job_id)
            first.setdefault(key, []).append(n)
    assert len(first) == SDK_KEYS + HTTP_KEYS
    for key, numbers in first.items():
        assert numbers == sorted(numbers), f"key {key} out of order"
    return len(stored) - len(sent)


def report(name: str, receipts: list[Receipt], answers: list[dict[str, Any]], **facts: Any) -> None:
    spooled = sum(r.spooled for r in receipts)
    http_spooled = sum(bool(a.get("spooled")) for a in answers)
    print(
        f"\n{name}: sdk {len(receipts)} jobs ({spooled} spooled), http {len(answers)} "
        f"({http_spooled} spooled), {json.dumps(facts)}"
    )


# -- Kafka ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    kafka = PrivateKafka(tmp_path_factory.mktemp("spool-kafka"))
    try:
        kafka.up()
        yield kafka
    finally:
        kafka.down()


async def read_kafka(kafka: PrivateKafka, topic: str) -> Found:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None)
    await consumer.start()
    found: Found = []
    try:
        await consumer._client.force_metadata_update()
        numbers = consumer._client.cluster.partitions_for_topic(topic) or ()
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        assert partitions
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        for partition in partitions:
            while await consumer.position(partition) < ends[partition]:
                batch = await consumer.getmany(partition, timeout_ms=2000)
                for record in batch.get(partition, []):
                    job_id = dict(record.headers)["ce_id"].decode()
                    body = json.loads(record.value)
                    found.append((body["key"], body["seq"], job_id))
    finally:
        await consumer.stop()
    return found


async def run_each_job_once(settings: Settings, sink: Path, ids: set[str]) -> int:
    """A worker (the recorder app, idempotency on) over the topic: each id runs once, a
    repeated record is skipped as a duplicate. Returns how many runs the sink saw."""
    await backend_for("kafka").provision(settings, ["test.record"])  # retry and DLQ topics
    async with running_worker(app, settings):
        await wait_until(lambda: len(read_sink(sink)) >= len(ids), 120, "every job to run")
        await asyncio.sleep(2)  # a repeat, if it were run, would show up now
    runs = [line.job_id for line in read_sink(sink, outcome="start")]
    assert sorted(runs) == sorted(ids), "each job ran exactly once"
    assert sorted(line.job_id for line in read_sink(sink)) == sorted(ids), "and completed"
    return len(runs)


@pytest.mark.timeout(420)
async def test_kafka_down_for_30s_every_job_arrives_in_key_order_and_runs_once(
    private_kafka: PrivateKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await private_kafka.create_topics([TOPIC], partitions=6)
    kafka = {
        "bootstrap_servers": private_kafka.bootstrap,
        "connect_timeout_s": 2.0,
        "publish_timeout_s": 3.0,
        "request_timeout_s": 3.0,
    }
    sdk = spool_settings(tmp_path, "sdk", transport="kafka", kafka=kafka)
    http = spool_settings(tmp_path, "http", transport="kafka", kafka=kafka)
    began = time.monotonic()
    receipts, answers, timings = await run_outage(
        sdk,
        http,
        lambda: asyncio.to_thread(private_kafka.down),
        lambda: asyncio.to_thread(private_kafka.up),
    )
    found = await read_kafka(private_kafka, TOPIC)
    repeats = check(found, receipts, answers)
    assert sum(r.spooled for r in receipts) > 0
    assert any(a["spooled"] for a in answers)
    timings["checked_s"] = time.monotonic() - began
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    worker = sdk.model_copy(
        update={
            "spool": sdk.spool.model_copy(update={"path": None}),
            "worker": sdk.worker.model_copy(update={"group": "spool-outage"}),
            "health": sdk.health.model_copy(update={"port": 0}),
        }
    )
    runs = await run_each_job_once(worker, sink, {job_id for *_, job_id in found})
    report(
        "kafka",
        receipts,
        answers,
        records=len(found),
        repeats=repeats,
        runs=runs,
        test_s=round(time.monotonic() - began, 1),
        **{k: round(v, 1) for k, v in timings.items()},
    )


# -- NATS ----------------------------------------------------------------------------------


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    yield server
    server.stop(signal.SIGKILL)


async def read_nats(url: str, stream: str) -> Found:
    client = await nats.connect(url)
    found: Found = []
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(stream, sequence)
            body = json.loads(message.data or b"{}")
            found.append((body["key"], body["seq"], (message.headers or {})["ce-id"]))
    finally:
        await client.close()
    return found


@pytest.mark.timeout(300)
async def test_nats_down_for_30s_every_job_is_stored_once_in_key_order(
    own_nats: OwnServer, tmp_path: Path
) -> None:
    await own_nats.start()
    stream = "SPOOL_OUTAGE"
    nats_settings = {"servers": [own_nats.url], "connect_timeout_s": 2.0, "publish_timeout_s": 3.0}
    routing = {"stream": stream}
    sdk = spool_settings(tmp_path, "sdk", transport="nats", nats=nats_settings, routing=routing)
    http = spool_settings(tmp_path, "http", transport="nats", nats=nats_settings, routing=routing)
    async with JobProducer(sdk) as provisioning:
        await provisioning.ensure(["test.record"])

    async def stop() -> None:
        own_nats.stop()

    began = time.monotonic()
    receipts, answers, timings = await run_outage(sdk, http, stop, own_nats.start)
    found = await read_nats(own_nats.url, stream)
    repeats = check(found, receipts, answers)
    assert repeats == 0, "JetStream dropped every repeat within its duplicate window"
    assert sum(r.spooled for r in receipts) > 0
    assert any(a["spooled"] for a in answers)
    report(
        "nats",
        receipts,
        answers,
        records=len(found),
        test_s=round(time.monotonic() - began, 1),
        **{k: round(v, 1) for k, v in timings.items()},
    )
