"""What only the JetStream worker has, on real NATS (the shared guarantees are in
test_contract.py):

- a job longer than the ack wait is kept by `in_progress` heartbeats, not redelivered;
- a server restart mid-run (file storage, a server of the test's own): the workers
  reconnect by themselves and every job is completed and acknowledged;
- a server gone for longer than the reconnect budget stops the worker with exit 1 and one
  clear line; an unreachable server at start does too;
- `jobstream topics ensure --transport nats` provisions the stream (with its key partition
  count), the dead-letter stream, the group's consumers and the KV buckets, with the limits
  from the settings, and producers then publish to the key's partition subject.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from consumer import Settings
from consumer.nats import (
    ensure_dead_letter_stream,
    ensure_key_partitions,
    max_deliver,
    stream_destinations,
)
from producer import JobProducer, PublishRequest
from producer.nats import ensure_nats_stream
from tests.apps.recorder import RecordJob, app
from tests.conftest import NATS_URL
from tests.own_services import OwnServer
from tests.support import (
    ROOT,
    fnv1a_partition,
    free_port,
    nats_env,
    publish_nats,
    read_sink,
    running_worker,
    start_ready_workers,
    stop_worker,
    wait_nats_consumer_settled,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def provision(url: str, settings: Settings, subject: str) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await ensure_nats_stream(js, stream_destinations(settings, [subject]), settings.routing)
        await ensure_key_partitions(js, settings)
        await ensure_dead_letter_stream(js, settings, [subject])
    finally:
        await client.close()


def names(tag: str) -> tuple[str, str, str]:
    """(stream, subject prefix, subject of test.record), fresh for this test."""
    stream = f"N_{tag}_{uuid.uuid4().hex[:8]}".upper()
    return stream, stream.lower(), f"{stream.lower()}.test.record"


@pytest.fixture
async def js() -> AsyncIterator[JetStreamContext]:
    client = await nats.connect(NATS_URL)
    yield client.jetstream()
    await client.close()


# -- heartbeats --------------------------------------------------------------------------------


async def test_a_job_longer_than_the_ack_wait_is_not_redelivered(
    js: JetStreamContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    stream, prefix, subject = names("long")
    settings = Settings(
        transport="nats",
        nats={"servers": [NATS_URL]},
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        worker={"group": "long"},
        jetstream={"ack_wait_s": 1},  # heartbeats every 1/3 s
    )
    await provision(NATS_URL, settings, subject)
    try:
        [job_id] = await publish_nats(subject, [("k", RecordJob(seq=0, key="k", sleep_ms=3500))])
        async with running_worker(app, settings):
            await wait_until(lambda: len(read_sink(sink)) == 1, 30, "the long job")
            info = await js.consumer_info(stream, "long")
            assert (info.num_redelivered, info.num_ack_pending) == (0, 0)
        runs = read_sink(sink, None)
        assert [(x.job_id, x.outcome) for x in runs] == [(job_id, "start"), (job_id, "done")]
        assert runs[1].end - runs[0].start >= 3.5, "ran 3.5 ack waits, in one delivery"
        assert runs[1].attempt == 1
    finally:
        await js.delete_stream(stream)
        await js.delete_stream(f"{stream}_DLQ")


# -- a server of our own: restarts and outages ---------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    yield server
    server.stop(signal.SIGKILL)


@pytest.mark.timeout(180)
async def test_workers_reconnect_after_a_server_restart_and_every_job_completes(
    own_server: OwnServer, tmp_path: Path
) -> None:
    await own_server.start()
    stream, prefix, subject = names("restart")
    settings = Settings(
        transport="nats", routing={"stream": stream, "subject_prefix": f"{prefix}."}
    )
    await provision(own_server.url, settings, subject)
    ids = await publish_nats(
        subject,
        [(f"k{i % 40}", RecordJob(seq=i, key=f"k{i % 40}", sleep_ms=10)) for i in range(1500)],
        url=own_server.url,
    )
    sink = tmp_path / "sink"
    env = worker_env(
        subject,
        "restart",
        sink,
        **nats_env(stream, prefix, JOBSTREAM_NATS__SERVERS=f'["{own_server.url}"]'),
        JOBSTREAM_NATS__RECONNECT_WAIT_S="0.5",
        JOBSTREAM_JETSTREAM__ACK_WAIT_S="5",
        JOBSTREAM_WORKER__MAX_IN_FLIGHT="16",
        # The idempotency store lives on the restarted server too: it is waited out.
        JOBSTREAM_IDEMPOTENCY__BACKEND="nats-kv",
        JOBSTREAM_IDEMPOTENCY__LEASE_S="5",
    )
    workers = await start_ready_workers(env, tmp_path, 2)
    try:
        await wait_until(lambda: len(read_sink(sink)) >= 300, 60, "300 jobs done")
        own_server.stop(signal.SIGKILL)  # a crash, not a clean shutdown
        done_before = len(read_sink(sink))
        await own_server.start()
        await wait_until(
            lambda: {line.job_id for line in read_sink(sink)} >= set(ids), 120, "every job done"
        )
        assert done_before < len(ids), "the restart happened mid-run"
        assert all(w.poll() is None for w in workers), "the workers survived the restart"
        await wait_nats_consumer_settled(own_server.url, stream, "restart", 60)
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0, 0]
    counts = collections.Counter(line.job_id for line in read_sink(sink))
    assert set(counts) == set(ids)
    # Only jobs running around the crash may have run twice (at most the in-flight bound of
    # each worker); everything else completed once.
    assert sum(1 for n in counts.values() if n > 1) <= 2 * 16


@pytest.mark.timeout(60)
async def test_a_server_gone_past_the_reconnect_budget_stops_the_worker_with_exit_1(
    own_server: OwnServer, tmp_path: Path
) -> None:
    await own_server.start()
    stream, prefix, subject = names("gone")
    settings = Settings(
        transport="nats", routing={"stream": stream, "subject_prefix": f"{prefix}."}
    )
    await provision(own_server.url, settings, subject)
    env = worker_env(
        subject,
        "gone",
        tmp_path / "sink",
        **nats_env(stream, prefix, JOBSTREAM_NATS__SERVERS=f'["{own_server.url}"]'),
        JOBSTREAM_NATS__RECONNECT_WAIT_S="0.2",
        JOBSTREAM_NATS__MAX_RECONNECT_ATTEMPTS="3",
    )
    [worker] = await start_ready_workers(env, tmp_path, 1)
    own_server.stop()
    assert worker.wait(30) == 1
    errors = [
        line
        for line in (tmp_path / "worker-0.log").read_text().splitlines()
        if line.startswith("error:")
    ]
    assert len(errors) == 1, errors
    assert "gave up after 3 reconnect attempts" in errors[0]
    assert own_server.url.removeprefix("nats://") in errors[0]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_unreachable_server_at_start_is_one_clear_error(tmp_path: Path) -> None:
    port = free_port()
    env = worker_env(
        "jobs.test.record",
        "nobody",
        tmp_path / "sink",
        **nats_env("JOBS", "jobs", JOBSTREAM_NATS__SERVERS=f'["nats://127.0.0.1:{port}"]'),
        JOBSTREAM_NATS__CONNECT_TIMEOUT_S="1",
        JOBSTREAM_WORKER__BROKER_WAIT_S="1",
    )
    result = run_cli("worker", "tests.apps.recorder:app", env=env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "JOBSTREAM_NATS__SERVERS" in lines[0]


# -- provisioning and key partitions -------------------------------------------------------


async def test_topics_ensure_provisions_streams_consumers_and_buckets(
    js: JetStreamContext, tmp_path: Path
) -> None:
    stream, prefix, subject = names("ensure")
    namespace = f"t{uuid.uuid4().hex[:8]}"
    ledger = f"{namespace}_replays"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **nats_env(stream, prefix),
        "JOBSTREAM_JOB_MODULES": '["tests.apps.recorder"]',
        "JOBSTREAM_WORKER__GROUP": "ens",
        "JOBSTREAM_JETSTREAM__KEY_PARTITIONS": "4",
        "JOBSTREAM_JETSTREAM__ACK_WAIT_S": "20",
        "JOBSTREAM_JETSTREAM__MAX_ACK_PENDING": "300",
        "JOBSTREAM_JETSTREAM__REPLAY_LEDGER_BUCKET": ledger,
        "JOBSTREAM_IDEMPOTENCY__BACKEND": "nats-kv",
        "JOBSTREAM_IDEMPOTENCY__NAMESPACE": namespace,
        "JOBSTREAM_IDEMPOTENCY__RETENTION_S": "3600",
        "JOBSTREAM_ROUTING__STREAM_MAX_AGE_S": "7200",
    }
    try:
        for _ in range(2):  # idempotent
            result = run_cli("topics", "ensure", "--transport", "nats", env=env)
            assert result.returncode == 0, result.stderr
        assert f"nats consumer {stream} > ens-p3" in result.stdout
        main = (await js.stream_info(stream)).config
        assert main.subjects == [f"{prefix}.>"]
        assert main.max_age == 7200
        assert (main.metadata or {}).get("jobstream.key-partitions") == "4"
        dead = (await js.stream_info(f"{stream}_DLQ")).config
        assert dead.subjects == [f"dlq.{prefix}.>"]
        assert dead.max_age == 30 * 24 * 3600
        expected_deliveries = max_deliver(Settings())  # 5 attempts + a margin of 3
        group = (await js.consumer_info(stream, "ens")).config
        assert (group.ack_wait, group.max_ack_pending, group.max_deliver) == (
            20,
            300,
            expected_deliveries,
        )
        assert group.filter_subjects == [subject]
        for n in range(4):
            partition = (await js.consumer_info(stream, f"ens-p{n}")).config
            assert partition.max_ack_pending == 1
            assert partition.filter_subjects == [f"{subject}.{n}"]
        bucket = await (await js.key_value(f"{namespace}_idempotency")).status()
        assert (bucket.history, bucket.ttl) == (1, 3600)
        await js.key_value(ledger)

        # Producers read the partition count from the stream: a keyed job goes to its
        # key's partition, a job without a key is spread by its id.
        settings = Settings(
            transport="nats",
            nats={"servers": [NATS_URL]},
            routing={"stream": stream, "subject_prefix": f"{prefix}."},
        )
        async with JobProducer(settings) as producer:
            keyed = await producer.publish(RecordJob(seq=1, key="user-42"), key="user-42")
            [loose] = await producer.publish_many([PublishRequest(RecordJob(seq=2, key="-"))])
        stored = await js.get_msg(stream, keyed.offset)
        assert stored.subject == f"{subject}.{fnv1a_partition('user-42', 4)}"
        stored = await js.get_msg(stream, loose.offset)
        assert stored.subject == f"{subject}.{fnv1a_partition(loose.job_id, 4)}"
    finally:
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
        for bucket_name in (f"{namespace}_idempotency", ledger):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(bucket_name)


async def test_a_worker_refuses_a_partition_count_that_differs_from_the_stream(
    js: JetStreamContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, prefix, subject = names("mismatch")
    partitioned = Settings(
        transport="nats",
        routing={"stream": stream, "subject_prefix": f"{prefix}."},
        jetstream={"key_partitions": 4},
    )
    await provision(NATS_URL, partitioned, subject)
    env = worker_env(subject, "mismatch", tmp_path / "sink", **nats_env(stream, prefix))
    try:
        result = run_cli("worker", "tests.apps.recorder:app", env=env)
        assert result.returncode == 1
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert "4 key partitions" in line and "JOBSTREAM_JETSTREAM__KEY_PARTITIONS=0" in line
    finally:
        await js.delete_stream(stream)
        await js.delete_stream(f"{stream}_DLQ")
