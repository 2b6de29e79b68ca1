"""`jobstream spool flush` against the shared Kafka: every spooled job is published, in
order and under its own id, and the spool is empty afterwards."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from producer import SpoolSettings
from producer._spool import SpoolFile
from schemas import encode
from schemas.examples import GenerateReport
from tests.conftest import KAFKA_BOOTSTRAP
from tests.unit.test_spool_cli import cli

pytestmark = pytest.mark.integration


async def read_ids(topic: str) -> list[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP, group_id=None)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        ids: list[str] = []
        while len(ids) < end:
            batch = await consumer.getmany(partition, timeout_ms=2000)
            ids += [dict(r.headers)["ce_id"].decode() for r in batch.get(partition, [])]
        return ids
    finally:
        await consumer.stop()


@pytest.mark.timeout(120)
async def test_flush_publishes_every_spooled_job_in_order(
    new_topic: Callable[..., Awaitable[str]], tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    path = tmp_path / "spool.db"
    spool = SpoolFile.open(path, SpoolSettings(path=path))
    jobs = [
        encode(GenerateReport(account_id=f"a{i}", month="2025-01"), source="/tests", key="k")
        for i in range(1200)  # more than one drain batch
    ]
    spool.append([(topic, message) for message in jobs])
    spool.close()
    done = cli(
        "spool",
        "flush",
        "--path",
        str(path),
        JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS=KAFKA_BOOTSTRAP,
    )
    assert done.returncode == 0, done.stderr
    assert "published 1200 jobs" in done.stdout
    assert await read_ids(topic) == [m.attributes.id for m in jobs]
    status = cli("spool", "status", "--path", str(path), "--json")
    assert json.loads(status.stdout)["jobs"] == 0
