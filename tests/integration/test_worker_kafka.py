"""The worker's guarantees on real Kafka, with real worker processes.

G1/G2/G3: 3 workers, 10,000 jobs, 6 partitions, 200 keys: each job once, per-key order.
G1 with a crash: SIGKILL one worker; the Redis store keeps redelivered jobs from rerunning.
G6: SIGTERM drains, commits, exits 0; a job cut off is redelivered and completes elsewhere.
G4: a 200,000-job backlog does not grow memory.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.apps.recorder import RecordJob
from tests.conftest import REDIS_URL
from tests.support import (
    publish_raw,
    read_sink,
    routed_topic,
    start_ready_workers,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _max_overlap(lines) -> int:
    events = sorted([(line.start, 1) for line in lines] + [(line.end, -1) for line in lines])
    level = best = 0
    for _, delta in events:
        level += delta
        best = max(best, level)
    return best


@pytest.mark.timeout(300)
async def test_three_workers_run_each_job_once_in_key_order(
    new_topic, group_id, tmp_path: Path
) -> None:
    topic = await routed_topic(new_topic, partitions=6)
    keys = [f"key-{k}" for k in range(200)]
    jobs = [(keys[i % 200], RecordJob(seq=i, key=keys[i % 200], sleep_ms=5)) for i in range(10_000)]
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_WORKER__ORDERING="key",
        JOBSTREAM_WORKER__MAX_IN_FLIGHT="64",
    )
    workers = await start_ready_workers(env, tmp_path, 3)
    ids = await publish_raw(topic, jobs)
    try:
        await wait_until(lambda: len(read_sink(sink)) >= 10_000, 180, "10,000 completed jobs")
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0, 0, 0]
    done = read_sink(sink)
    assert collections.Counter(line.job_id for line in done) == collections.Counter(ids)
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for line in done:
        by_key[line.key].append(line.seq)
    assert len(by_key) == 200
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"{key} ran out of publish order"
    assert len({line.pid for line in done}) == 3, "all three workers took part"
    assert _max_overlap(done) > 6, "key mode runs more jobs at once than there are partitions"


@pytest.mark.timeout(300)
async def test_sigkill_loses_nothing_and_redis_store_skips_completed_jobs(
    new_topic, group_id, tmp_path: Path
) -> None:
    topic = await routed_topic(new_topic, partitions=6)
    jobs = [(f"k{i % 50}", RecordJob(seq=i, key=f"k{i % 50}", sleep_ms=5)) for i in range(3000)]
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_IDEMPOTENCY__BACKEND="redis",
        JOBSTREAM_IDEMPOTENCY__URL=REDIS_URL,
        JOBSTREAM_IDEMPOTENCY__NAMESPACE=f"t{uuid.uuid4().hex[:8]}",
        JOBSTREAM_IDEMPOTENCY__LEASE_S="3",
        JOBSTREAM_WORKER__MAX_IN_FLIGHT="16",
        # Commit rarely, so the killed worker leaves many completed-but-uncommitted jobs.
        JOBSTREAM_WORKER__COMMIT_INTERVAL_S="30",
        JOBSTREAM_WORKER__COMMIT_EVERY="100000",
    )
    workers = await start_ready_workers(env, tmp_path, 3)
    ids = await publish_raw(topic, jobs)
    try:

        def all_busy() -> bool:
            lines = read_sink(sink)
            return len({x.pid for x in lines}) == 3 and len(lines) >= 600

        await wait_until(all_busy, 120, "all workers busy")
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        done_by_victim = {line.job_id for line in read_sink(sink) if line.pid == victim.pid}
        await wait_until(
            lambda: {line.job_id for line in read_sink(sink)} >= set(ids), 180, "every job done"
        )
    finally:
        codes = [stop_worker(w) for w in workers[1:]]
    assert codes == [0, 0]
    done = read_sink(sink)
    counts = collections.Counter(line.job_id for line in done)
    assert set(counts) == set(ids)
    twice = {job_id for job_id, n in counts.items() if n > 1}
    # The victim completed many jobs whose offsets it never committed (commits were 30 s
    # apart): all of them were redelivered, and the store turned them into no-ops. Only a
    # job killed between its side effect and the store's completion record may run again,
    # and there are at most max_in_flight of those.
    assert len(done_by_victim) > 100
    assert len(twice) <= 16
    assert twice <= done_by_victim


@pytest.mark.timeout(180)
async def test_sigterm_drains_commits_and_redelivers_the_cut_off_job(
    new_topic, group_id, tmp_path: Path, kafka_admin
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    jobs = [(f"k{i}", RecordJob(seq=i, key=f"k{i}", sleep_ms=1500)) for i in range(3)]
    jobs.append(("k-hang", RecordJob(seq=3, key="k-hang", behaviour="hang-once")))
    ids = await publish_raw(topic, jobs)
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_WORKER__DRAIN_TIMEOUT_S="4",
        JOBSTREAM_WORKER__ORDERING="none",
    )
    first = start_worker(env, tmp_path / "w1.log")
    await wait_until(lambda: len(read_sink(sink, "start")) == 4, 60, "4 jobs started")
    signalled = time.monotonic()
    assert stop_worker(first) == 0
    assert time.monotonic() - signalled < 4 + 3, "exited within the drain timeout"
    assert sorted(line.seq for line in read_sink(sink)) == [0, 1, 2], "in-flight jobs finished"
    offsets = await kafka_admin.list_consumer_group_offsets(group_id)
    assert [meta.offset for meta in offsets.values()] == [3], "committed up to the cut-off job"

    second = start_worker(env, tmp_path / "w2.log")
    try:
        await wait_until(lambda: len(read_sink(sink)) == 4, 60, "the cut-off job completed")
    finally:
        assert stop_worker(second) == 0
    last = read_sink(sink)[-1]
    assert (last.job_id, last.pid) == (ids[3], second.pid)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(400)
async def test_a_200k_backlog_keeps_memory_flat(new_topic, group_id, tmp_path: Path) -> None:
    topic = await routed_topic(new_topic, partitions=4)
    payload = "x" * 200
    await publish_raw(
        topic,
        ((f"k{i % 1000}", RecordJob(seq=i, key=payload, sleep_ms=20)) for i in range(200_000)),
    )
    sink = tmp_path / "sink"
    env = worker_env(topic, group_id, sink, JOBSTREAM_WORKER__MAX_IN_FLIGHT="32")
    worker = start_worker(env, tmp_path / "w.log")
    try:
        await wait_until(lambda: len(read_sink(sink)) >= 500, 60, "the worker to get going")
        samples = []
        for _ in range(20):
            samples.append(_rss_kb(worker.pid))
            await asyncio.sleep(0.5)
        processed = len(read_sink(sink))
    finally:
        assert stop_worker(worker) == 0
    # 200,000 records of ~400 bytes would be ~80 MB if buffered; the bound keeps the
    # worker within a few MB of where it started, whatever the backlog.
    growth_mb = (max(samples) - samples[0]) / 1024
    assert growth_mb < 20, f"RSS grew {growth_mb:.1f} MB: {samples}"
    assert 500 <= processed < 200_000
