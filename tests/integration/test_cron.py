"""Cron on the real brokers (issue 15's evidence): 3 worker processes of `tests.apps.cron`
(a tick every 2 s), the leading one SIGKILLed at a tick: each of 20 consecutive ticks
completes exactly once. Kafka with the Redis store, NATS with the NATS KV store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from nats.js.errors import BucketNotFoundError, NotFoundError

from tests.conftest import KAFKA_BOOTSTRAP, NATS_URL, REDIS_URL
from tests.support import ROOT, start_ready_workers, stop_worker, wait_until

pytestmark = pytest.mark.integration

TICKS = 20
PERIOD_S = 2


def env_for(broker: str, run: str, sink: Path) -> dict[str, str]:
    common = {
        "JOBSTREAM_TRANSPORT": broker,
        "JOBSTREAM_JOB_MODULES": json.dumps(["tests.apps.cron"]),
        "JOBSTREAM_WORKER__GROUP": f"g-{run}",
        "JOBSTREAM_CRON__LEASE_S": "2",
        "JOBSTREAM_CRON__GRACE_S": "10",
        "JOBSTREAM_LOGGING__LEVEL": "INFO",
        "JOBSTREAM_TEST_SINK": str(sink),
        "PYTHONPATH": str(ROOT),
    }
    if broker == "kafka":
        return {
            **common,
            "JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
            "JOBSTREAM_ROUTING__ROUTES": json.dumps({"test.cron.tick": f"t-cron-{run}"}),
            "JOBSTREAM_ROUTING__PARTITIONS": "3",
            "JOBSTREAM_RETRY__TIERS_S": "[0.5, 2.0]",
            "JOBSTREAM_WORKER__SESSION_TIMEOUT_S": "6",
            "JOBSTREAM_WORKER__REVOKE_TIMEOUT_S": "2",
            "JOBSTREAM_IDEMPOTENCY__BACKEND": "redis",
            "JOBSTREAM_IDEMPOTENCY__URL": REDIS_URL,
            "JOBSTREAM_IDEMPOTENCY__NAMESPACE": f"cron-{run}",
        }
    return {
        **common,
        "JOBSTREAM_NATS__SERVERS": json.dumps([NATS_URL]),
        "JOBSTREAM_ROUTING__STREAM": f"CRON_{run}",
        "JOBSTREAM_ROUTING__SUBJECT_PREFIX": f"cron{run}.",
        "JOBSTREAM_JETSTREAM__ACK_WAIT_S": "6",  # what the killed one held comes back soon
        "JOBSTREAM_IDEMPOTENCY__BACKEND": "nats-kv",
        "JOBSTREAM_IDEMPOTENCY__NAMESPACE": f"cron_{run}",
    }


def jobstream(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "jobstream", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()[-600:]
    return result.stdout.decode()


def ticks_done(sink: Path) -> Counter[datetime]:
    """How many runs completed per tick."""
    if not sink.exists():
        return Counter()
    return Counter(
        datetime.fromisoformat(line.split()[1]) for line in sink.read_text().splitlines()
    )


def leader(logs: Path, count: int) -> int | None:
    """The index of the worker whose log says last that it leads (None: none yet)."""
    found: list[tuple[str, int]] = []
    for index in range(count):
        path = logs / f"worker-{index}.log"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"cron: ' in line and " leads (" in line:
                found.append((json.loads(line)["time"], index))
    return max(found)[1] if found else None


async def clean_up(broker: str, run: str) -> None:
    """Delete what `topics ensure` created for this run (the store's keys expire)."""
    if broker == "kafka":
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA_BOOTSTRAP)
        await admin.start()
        try:
            topic = f"t-cron-{run}"
            names = set(await admin.list_topics())
            await admin.delete_topics(sorted(n for n in names if n.startswith(topic)))
        finally:
            await admin.close()
        return
    client = await nats.connect(NATS_URL)
    try:
        js = client.jetstream()
        for stream in (f"CRON_{run}", f"CRON_{run}_DLQ"):
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(stream)
        with contextlib.suppress(NotFoundError, BucketNotFoundError):
            await js.delete_key_value(f"cron_{run}_idempotency")
    finally:
        await client.drain()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["kafka", "nats"])
async def test_a_leader_killed_at_a_tick_loses_no_tick_and_runs_none_twice(
    broker: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    sink = tmp_path / "sink.txt"
    env = {**os.environ, **env_for(broker, run, sink)}
    jobstream(env, "topics", "ensure")
    workers = await start_ready_workers(env, tmp_path, 3, "tests.apps.cron:app")
    ready = datetime.fromtimestamp(time.time(), UTC)
    try:
        # Ticks of a running group first (the first leader also publishes the ticks of
        # its grace before it started: a new schedule), then the kill.
        await wait_until(
            lambda: len([t for t in ticks_done(sink) if t > ready]) >= 3, 60, "three ticks"
        )
        index = leader(tmp_path, 3)
        assert index is not None, "no worker says it leads"
        now = time.time()
        killed_at = (int(now) // PERIOD_S + 1) * PERIOD_S
        await asyncio.sleep(killed_at - now)  # right at a tick
        workers[index].send_signal(signal.SIGKILL)
        workers[index].wait()
        kill = datetime.fromtimestamp(killed_at, UTC)
        wanted = [kill + timedelta(seconds=PERIOD_S * (n - 3)) for n in range(TICKS)]
        await wait_until(
            lambda: all(tick in ticks_done(sink) for tick in wanted), 120, f"{TICKS} ticks done"
        )
        await asyncio.sleep(3 * PERIOD_S)  # room for a duplicate to show up
    finally:
        codes = [stop_worker(w) for w in workers]
        await clean_up(broker, run)
    successor = leader(tmp_path, 3)
    assert successor is not None
    assert successor != index, "another worker took the lead over"
    done = ticks_done(sink)
    assert [done[tick] for tick in wanted] == [1] * TICKS, sorted(done.items())
    assert all(count == 1 for count in done.values()), sorted(done.items())
    assert sorted(codes)[1:] == [0, 0], codes  # the killed one: -9


def published(logs: Path, count: int) -> list[tuple[int, datetime, datetime]]:
    """(worker index, tick, when logged) of every tick a worker's log says it published."""
    found: list[tuple[int, datetime, datetime]] = []
    for index in range(count):
        path = logs / f"worker-{index}.log"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"cron: published tick ' not in line:
                continue
            entry = json.loads(line)
            tick = datetime.fromisoformat(entry["message"].split()[3])
            found.append((index, tick, datetime.fromisoformat(entry["time"])))
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["kafka", "nats"])
async def test_a_leader_paused_past_its_lease_publishes_nothing_when_it_resumes(
    broker: str, tmp_path: Path
) -> None:
    """The leader SIGSTOPped between two ticks for 2.5 leases, then SIGCONTed: another
    worker leads meanwhile, the paused one publishes no tick once resumed (it checks its
    lease right before each publish), and each tick is published once and completes once."""
    run = uuid.uuid4().hex[:8]
    sink = tmp_path / "sink.txt"
    env = {**os.environ, **env_for(broker, run, sink)}
    jobstream(env, "topics", "ensure")
    workers = await start_ready_workers(env, tmp_path, 3, "tests.apps.cron:app")
    ready = datetime.fromtimestamp(time.time(), UTC)
    try:
        await wait_until(
            lambda: len([t for t in ticks_done(sink) if t > ready]) >= 3, 60, "three ticks"
        )
        index = leader(tmp_path, 3)
        assert index is not None, "no worker says it leads"
        now = time.time()
        paused_at = (int(now) // PERIOD_S + 1) * PERIOD_S + PERIOD_S / 2  # between ticks
        await asyncio.sleep(paused_at - now)
        workers[index].send_signal(signal.SIGSTOP)
        await asyncio.sleep(5)  # 2.5 leases of 2 s: taken over after about 1.4
        workers[index].send_signal(signal.SIGCONT)
        pause = datetime.fromtimestamp(paused_at, UTC)
        wanted = [pause + timedelta(seconds=PERIOD_S * n - PERIOD_S / 2) for n in range(-2, 18)]
        await wait_until(
            lambda: all(tick in ticks_done(sink) for tick in wanted), 120, f"{TICKS} ticks done"
        )
        await asyncio.sleep(3 * PERIOD_S)
        stopping = datetime.now(UTC)  # (then a stopping leader hands over, maybe to it)
    finally:
        codes = [stop_worker(w) for w in workers]
        await clean_up(broker, run)
    assert codes == [0, 0, 0], codes
    publishes = published(tmp_path, 3)
    by_tick = Counter(tick for _, tick, _ in publishes)
    assert [by_tick[tick] for tick in wanted] == [1] * TICKS, sorted(by_tick.items())
    assert all(count == 1 for count in by_tick.values()), sorted(by_tick.items())
    late = [tick for i, tick, at in publishes if i == index and pause < tick and at < stopping]
    assert late == [], "the paused leader published after it lost its lease"
    done = ticks_done(sink)
    assert [done[tick] for tick in wanted] == [1] * TICKS, sorted(done.items())
    assert all(count == 1 for count in done.values()), sorted(done.items())
