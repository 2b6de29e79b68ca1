"""A worker started while Kafka is down waits `worker.broker_wait_s` for it, for every
connection it opens (the consumer and the publisher of retries and dead letters alike),
then runs: a Kubernetes rollout during a broker restart does not crash-loop the workers.

The broker is "down" behind a TCP forwarder that starts listening only after a while: the
worker bootstraps through it; the broker's advertised address takes over after that.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.apps.recorder import RecordJob
from tests.conftest import KAFKA_BOOTSTRAP
from tests.support import (
    free_port,
    publish_raw,
    read_sink,
    routed_topic,
    start_worker,
    stop_worker,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def late_broker(port: int, after_s: float) -> AsyncIterator[None]:
    """Forward 127.0.0.1:`port` to the test Kafka, listening only `after_s` from now."""
    host, broker_port = KAFKA_BOOTSTRAP.split(":")

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(broker_port))
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    async def serve() -> None:
        await asyncio.sleep(after_s)
        server = await asyncio.start_server(forward, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.timeout(120)
async def test_a_worker_started_while_kafka_is_down_waits_for_it_then_runs(
    new_topic, group_id, tmp_path: Path
) -> None:
    topic = await routed_topic(new_topic, partitions=1)
    ids = await publish_raw(topic, [(None, RecordJob(seq=n, key="k")) for n in range(3)])
    port = free_port()
    sink = tmp_path / "sink"
    env = worker_env(
        topic,
        group_id,
        sink,
        JOBSTREAM_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
        JOBSTREAM_KAFKA__CONNECT_TIMEOUT_S="1",  # the publisher's own budget, per attempt
        JOBSTREAM_WORKER__BROKER_WAIT_S="60",
    )
    async with late_broker(port, after_s=6.0):
        worker = start_worker(env, tmp_path / "w.log")
        try:
            await wait_until(
                lambda: len(read_sink(sink)) == 3 or worker.poll() is not None, 90, "jobs"
            )
            assert worker.poll() is None, (tmp_path / "w.log").read_text()[-800:]
        finally:
            code = stop_worker(worker)
    assert sorted(line.job_id for line in read_sink(sink)) == sorted(ids)
    assert code == 0
