"""A claim outlives a NATS server outage (issue 13, K4), with the NATS KV idempotency store
on a server of the test's own.

Jobs finish while the server is down for longer than the claims' lease: their completion
cannot be recorded and their ack waits run out, so JetStream redelivers them when the
server is back. The holders still own their claims then (a running claim is kept for
`HOLD_LEASES` leases), record the completions within a lease, and every redelivery waits
for that and is skipped: no job runs twice.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer import Settings
from tests.apps.recorder import RecordJob
from tests.integration.test_nats_worker import names, provision
from tests.own_services import OwnServer
from tests.support import (
    nats_env,
    publish_nats,
    read_sink,
    start_ready_workers,
    stop_worker,
    wait_nats_consumer_settled,
    wait_until,
    worker_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = 8
OUTAGE_S = 11.0
LEASE_S = 10.0


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    yield server
    server.stop(signal.SIGKILL)


@pytest.mark.timeout(120)
async def test_jobs_finishing_during_an_outage_longer_than_the_lease_run_once(
    own_server: OwnServer, tmp_path: Path
) -> None:
    await own_server.start()
    stream, prefix, subject = names("claims")
    settings = Settings(
        transport="nats", routing={"stream": stream, "subject_prefix": f"{prefix}."}
    )
    await provision(own_server.url, settings, subject)
    sink = tmp_path / "sink"
    env = worker_env(
        subject,
        "claims",
        sink,
        **nats_env(stream, prefix, JOBSTREAM_NATS__SERVERS=f'["{own_server.url}"]'),
        JOBSTREAM_NATS__RECONNECT_WAIT_S="0.5",
        JOBSTREAM_JETSTREAM__ACK_WAIT_S="4",
        JOBSTREAM_IDEMPOTENCY__BACKEND="nats-kv",
        JOBSTREAM_IDEMPOTENCY__LEASE_S=str(LEASE_S),
        JOBSTREAM_LOGGING__LEVEL="INFO",
    )
    workers = await start_ready_workers(env, tmp_path, 2)
    try:
        jobs = [(f"k{n}", RecordJob(seq=n, key=f"k{n}", sleep_ms=3000)) for n in range(JOBS)]
        ids = await publish_nats(subject, jobs, url=own_server.url)
        await wait_until(lambda: len(read_sink(sink, "start")) == JOBS, 30, "every job started")
        own_server.stop(signal.SIGKILL)  # the jobs finish while the server is away
        await wait_until(lambda: len(read_sink(sink)) == JOBS, 10, "every job finished")
        await asyncio.sleep(OUTAGE_S - 3)
        await own_server.start()
        await wait_nats_consumer_settled(own_server.url, stream, "claims", 30)
    finally:
        codes = [stop_worker(w) for w in workers]
    assert codes == [0, 0]
    started = collections.Counter(line.job_id for line in read_sink(sink, "start"))
    done = collections.Counter(line.job_id for line in read_sink(sink))
    assert started == collections.Counter(ids), "no job ran a second time"
    assert done == collections.Counter(ids), "each job had exactly one effect"
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
    # JetStream delivered the jobs again after the restart (its consumer state on a killed
    # server may count them as first deliveries): each such delivery was skipped, either
    # after waiting for the holder ("it completed: skipped") or, when the holder had
    # recorded the completion first, at once. Which comes first is a race; both are right.
    assert '"message":"job duplicate"' in logs, "a redelivery was skipped as a duplicate"
    assert "taking over the claim" not in logs
