"""G8: an exception, a timeout or a cancelled task in one job never stops the worker or
another job; each is settled, so the partition's commit moves past it."""

from __future__ import annotations

import asyncio
import json

import pytest

from consumer import App, JobContext, Settings, Worker
from consumer.kafka import KafkaSource
from tests.apps.recorder import RecordJob
from tests.apps.recorder import handle as record_handler
from tests.support import publish_raw, read_sink, wait_until

pytestmark = pytest.mark.integration

app = App("isolation")


@app.handler(RecordJob, timeout_s=0.5)
async def handle(job: RecordJob, ctx: JobContext) -> None:
    await record_handler(job, ctx)


async def test_failing_jobs_do_not_stop_the_worker_or_other_jobs(
    new_topic, group_id, tmp_path, monkeypatch, kafka_admin
) -> None:
    sink = tmp_path / "sink"
    monkeypatch.setenv("JOBSTREAM_TEST_SINK", str(sink))
    topic = await new_topic(partitions=1)
    behaviours = ["ok", "raise", "ok", "hang", "ok", "cancelled", "ok"]
    jobs = [(None, RecordJob(seq=i, key="k", behaviour=b)) for i, b in enumerate(behaviours)]  # type: ignore[arg-type]
    ids = await publish_raw(topic, jobs)
    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.record": topic}))
    settings = Settings(
        worker={"group": group_id, "commit_interval_s": 0.2, "ordering": "partition"}
    )
    worker = Worker(app, settings, KafkaSource(settings, [topic]))
    runner = asyncio.create_task(worker.run())
    await wait_until(
        lambda: worker.counts.get("failed", 0) == 3 and len(read_sink(sink)) == 4,
        30,
        "4 completions and 3 failures",
    )
    committed = 0
    while committed != 7:
        offsets = await kafka_admin.list_consumer_group_offsets(group_id)
        committed = sum(meta.offset for meta in offsets.values())
        await asyncio.sleep(0.1)
    worker.stop()
    await runner
    assert not runner.exception()
    assert [line.seq for line in read_sink(sink)] == [0, 2, 4, 6]
    assert worker.counts == {"completed": 4, "failed": 3}
    assert {line.job_id for line in read_sink(sink, None)} == set(ids)
