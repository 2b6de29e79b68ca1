"""In-process worker on real Kafka: the basic path, end to end."""

from __future__ import annotations

import asyncio
import json

import pytest

from consumer import Settings, Worker
from consumer.kafka import KafkaSource
from tests.apps.recorder import RecordJob, app
from tests.support import publish_raw, read_sink, wait_until

pytestmark = pytest.mark.integration


async def test_worker_processes_every_job_and_commits(
    new_topic, group_id, tmp_path, monkeypatch, kafka_admin
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await new_topic(partitions=3)
    ids = await publish_raw(
        topic, [(f"k{i % 7}", RecordJob(seq=i, key=f"k{i % 7}")) for i in range(300)]
    )
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.record": topic}))
    settings = Settings(worker={"group": group_id, "commit_interval_s": 0.2})
    worker = Worker(app, settings, KafkaSource(settings, [topic]))
    runner = asyncio.create_task(worker.run())
    await wait_until(lambda: len(read_sink(sink)) >= 300, 30, "300 jobs")
    worker.stop()
    await runner
    assert sorted(line.job_id for line in read_sink(sink)) == sorted(ids)
    offsets = await kafka_admin.list_consumer_group_offsets(group_id)
    assert sum(meta.offset for meta in offsets.values()) == 300


def test_worker_with_no_broker_exits_with_one_clear_line(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    env = {
        **__import__("os").environ,
        "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}",
        "JOBSTREAM_WORKER__BROKER_WAIT_S": "2",
        "JOBSTREAM_KAFKA__CONNECT_TIMEOUT_S": "2",
        "JOBSTREAM_HEALTH__PORT": "0",
        "JOBSTREAM_TEST_SINK": str(tmp_path / "sink"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", "worker", "tests.apps.recorder:app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"127.0.0.1:{closed_port}" in last
    assert "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS" in last
