"""Issue 13 on Kafka: K6, the worker keeps polling while records fetched earlier wait for a
slot (so the group does not evict it and hand its partition to another worker mid-job);
K7, a partition behind one long job does not make the worker remember every later offset.
"""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from consumer import App, JobContext, Settings
from schemas import Job
from tests.apps.recorder import RecordJob
from tests.support import (
    publish_raw,
    read_sink,
    routed_topic,
    running_worker,
    start_ready_workers,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Step(Job, type="test.bounds.step", version=1, register=False):
    n: int


@pytest.mark.timeout(120)
async def test_a_partition_behind_one_long_job_holds_a_bounded_number_of_offsets(
    new_topic, group_id, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    release = asyncio.Event()
    done: collections.Counter[int] = collections.Counter()
    app = App("bounds")

    @app.handler(Step)
    async def handle(job: Step, ctx: JobContext) -> None:
        if job.n == 0:
            await release.wait()  # the long job at the head of the partition
        done[job.n] += 1

    monkeypatch.setenv("JOBSTREAM_ROUTING__ROUTES", json.dumps({"test.bounds.step": topic}))
    settings = Settings(
        retry={"tiers_s": [0.5, 2.0]},
        worker={
            "group": group_id,
            "ordering": "none",
            "max_in_flight": 64,
            "max_held_offsets": 200,
            "commit_interval_s": 0.2,
        },
    )
    await publish_raw(topic, [(None, Step(n=n)) for n in range(2001)])
    async with running_worker(app, settings) as worker:
        tracker = worker.source.tracker  # type: ignore[attr-defined]
        tp = TopicPartition(topic, 0)
        await wait_until(lambda: sum(done.values()) >= 150, 60, "jobs behind the long one")
        samples = []
        for _ in range(20):
            samples.append(tracker.held(tp))
            await asyncio.sleep(0.1)
        assert max(samples) <= 200, f"held offsets grew past the bound: {samples}"
        assert sum(done.values()) < 200, "nothing past the bound was fetched"
        release.set()
        await wait_until(lambda: sum(done.values()) == 2001, 60, "every job after the release")
    assert set(done.values()) == {1}, "each job ran once"


@pytest.mark.timeout(120)
async def test_a_worker_with_records_waiting_for_a_slot_keeps_polling_and_its_partition(
    new_topic, group_id, tmp_path: Path
) -> None:
    """One partition, one job at a time, 1 s jobs, `max_poll_interval_s` = 5: the worker
    holds records it fetched for longer than that; it must keep polling, or the group
    evicts it and hands the partition to the second worker while its jobs still run."""
    topic = await routed_topic(new_topic, partitions=1)
    jobs = [("k", RecordJob(seq=n, key="k", sleep_ms=1000)) for n in range(10)]
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_WORKER__ORDERING="partition",
        JOBSTREAM_WORKER__MAX_IN_FLIGHT="1",
        JOBSTREAM_WORKER__MAX_POLL_INTERVAL_S="5",
        JOBSTREAM_WORKER__SESSION_TIMEOUT_S="6",
    )
    workers = await start_ready_workers(env, tmp_path, 2)
    try:
        await publish_raw(topic, jobs)
        await wait_until(lambda: len(read_sink(sink)) >= 10, 90, "10 jobs done")
        await asyncio.sleep(1)  # a duplicate run would show up now
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0, 0]
    starts = read_sink(sink, "start")
    assert collections.Counter(line.seq for line in starts) == {n: 1 for n in range(10)}
    assert len({line.pid for line in starts}) == 1, "the partition never moved mid-run"
