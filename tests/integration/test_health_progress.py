"""`/readyz` and `/livez` follow progress, not flags (issue 13, K5):

- a Kafka broker that hangs for 27 s (SIGSTOP, a broker of the module's own) turns
  `/readyz` 503 on every worker, the one reading the partition and the idle one, within
  the readiness silence; `/livez` stays 200; once the broker answers again `/readyz` is 200
  again and new jobs complete, each once;
- a JetStream consumer deleted on the server is re-created by the worker, which stays up
  and ready, and the jobs published after the deletion complete, each once.

The third instance of the issue (a dead `cpu_bound` pool process) is in
tests/unit/test_broken_process_pool.py: it needs no broker.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from consumer import Settings
from tests.apps.recorder import RecordJob
from tests.conftest import NATS_URL
from tests.integration.test_nats_worker import names, provision
from tests.own_services import PrivateKafka, private_kafka_for_module
from tests.support import (
    free_port,
    http_status,
    nats_env,
    publish_nats,
    read_sink,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HANG_S = 27.0
READINESS_SILENCE_S = 8.0  # the default for worker.session_timeout_s = 12: two thirds


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    with private_kafka_for_module(tmp_path_factory.mktemp("kafka-run")) as kafka:
        yield kafka


def done_counts(sink: Path) -> collections.Counter[str]:
    return collections.Counter(line.job_id for line in read_sink(sink))


def statuses(ports: list[int], path: str) -> list[int]:
    return [http_status(port, path) for port in ports]


async def start_workers(
    env: dict[str, str], logs: Path, count: int
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    ports = [free_port() for _ in range(count)]
    workers = [
        start_worker({**env, "JOBSTREAM_HEALTH__PORT": str(port)}, logs / f"worker-{i}.log")
        for i, port in enumerate(ports)
    ]
    return workers, ports


@pytest.mark.timeout(300)
async def test_a_hung_kafka_makes_every_worker_unready_then_ready_again(
    private_kafka: PrivateKafka, tmp_path: Path
) -> None:
    kafka = private_kafka
    topic = f"health-{uuid.uuid4().hex[:8]}"
    group = f"g-{topic}"
    await kafka.create_topics([topic, f"{topic}.retry.1", f"{topic}.retry.2", f"{topic}.dlq"])
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group,
        sink,
        JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap,
        JOBSTREAM_WORKER__SESSION_TIMEOUT_S="12",
    )
    # One partition, two workers: one reads it, the other is an idle member of the group.
    workers, ports = await start_workers(env, tmp_path, 2)
    try:
        await wait_until(lambda: statuses(ports, "/readyz") == [200, 200], 90, "workers ready")
        first = await kafka.publish(topic, [("k", RecordJob(seq=0, key="k"))])
        await wait_until(lambda: done_counts(sink) == {first[0]: 1}, 30, "the first job")
        committed: list[int | None] = [None]

        async def poll_committed() -> None:
            committed[0] = await kafka.committed(group, topic)

        deadline = time.monotonic() + 30
        while committed[0] != 1:  # its offset committed: a rebalance will not run it again
            assert time.monotonic() < deadline, "the first job's offset was not committed"
            await poll_committed()
            await asyncio.sleep(0.2)

        kafka.pause()
        paused = time.monotonic()
        unready_at: dict[int, float] = {}
        live: list[int] = []
        try:
            while time.monotonic() - paused < HANG_S:
                for port, status in zip(ports, statuses(ports, "/readyz"), strict=True):
                    if status == 503:
                        unready_at.setdefault(port, time.monotonic() - paused)
                live.extend(statuses(ports, "/livez"))
                await asyncio.sleep(0.5)
        finally:
            kafka.resume()
        assert sorted(unready_at) == sorted(ports), f"unready: {unready_at} of {ports}"
        # Bounded: the readiness silence, plus a probe period and slack for a busy machine.
        assert max(unready_at.values()) < READINESS_SILENCE_S + 12, unready_at
        assert set(live) == {200}, "a hung broker is not a reason to restart the worker"
        assert [worker.poll() for worker in workers] == [None, None]

        await wait_until(
            lambda: statuses(ports, "/readyz") == [200, 200], 90, "ready again after the hang"
        )
        later = await kafka.publish(
            topic, [(f"k{seq}", RecordJob(seq=seq, key=f"k{seq}")) for seq in range(1, 6)]
        )
        expected = dict.fromkeys([*first, *later], 1)
        await wait_until(lambda: done_counts(sink) == expected, 60, "every job done, once")
    finally:
        codes = [stop_worker(worker) for worker in workers]
    assert codes == [0, 0]


@pytest.fixture
async def js() -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(NATS_URL)
    yield client.jetstream()
    await client.close()


@pytest.mark.timeout(180)
async def test_a_deleted_jetstream_consumer_is_recreated_and_new_jobs_complete(
    js: JetStreamContext, tmp_path: Path
) -> None:
    stream, prefix, subject = names("lost")
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": "lost"},
    )
    await provision(NATS_URL, settings, subject)
    sink = tmp_path / "sink"
    env = worker_env(subject, "lost", sink, **nats_env(stream, prefix))
    [worker], [port] = await start_workers(env, tmp_path, 1)
    try:
        await wait_until(lambda: http_status(port, "/readyz") == 200, 60, "the worker ready")
        first = await publish_nats(
            subject, [(f"k{seq}", RecordJob(seq=seq, key=f"k{seq}")) for seq in range(3)]
        )
        await wait_until(lambda: set(done_counts(sink)) == set(first), 30, "the first jobs")

        await js.delete_consumer(stream, "lost")
        later = await publish_nats(
            subject, [(f"k{seq}", RecordJob(seq=seq, key=f"k{seq}")) for seq in range(3, 9)]
        )
        expected = dict.fromkeys([*first, *later], 1)
        await wait_until(lambda: done_counts(sink) == expected, 60, "every job done, once")
        info = await js.consumer_info(stream, "lost")
        assert info.config.durable_name == "lost", "re-created from the worker's plan"
        assert worker.poll() is None
        assert http_status(port, "/readyz") == 200
        assert http_status(port, "/livez") == 200
    finally:
        code = stop_worker(worker)
        await js.delete_stream(stream)
        await js.delete_stream(f"{stream}_DLQ")
    assert code == 0
