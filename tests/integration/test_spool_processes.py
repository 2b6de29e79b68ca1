"""Three producer processes (multiprocessing, spawn) share one spool path while the NATS
server of the test is down: each owns a slot file of its own (`spool.db`, `.1`, `.2`). One
process exits with its jobs still spooled; once the server is back (its stream created a
little later: meanwhile the drainers see a missing destination), the two left publish
their own jobs and take over the orphaned slot. Every job is stored exactly once, and each
process's per-key order holds."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import signal
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import nats
import pytest

from producer import JobProducer, ProducerSettings, read_spool_status
from tests.apps.recorder import RecordJob
from tests.own_services import OwnServer

pytestmark = pytest.mark.integration

PROCESSES, KEYS, PER_KEY = 3, 4, 50  # 600 jobs
STREAM = "SPOOL_PROCESSES"
SUBJECT = "jobs.spool.processes"


def settings(url: str, path: Path) -> ProducerSettings:
    return ProducerSettings(
        transport="nats",
        nats={"servers": [url], "connect_timeout_s": 1.0, "publish_timeout_s": 2.0},
        routing={"stream": STREAM, "routes": {"test.record": SUBJECT}},
        spool={"path": path, "retry_initial_s": 0.1, "retry_max_s": 0.5, "stop_drain_s": 0},
    )


def producer_process(
    number: int, url: str, path: str, results: Any, stop: Event, leave: bool
) -> None:
    """Publish `KEYS * PER_KEY` jobs (keys of this process's own), report the receipts;
    then exit at once (`leave`: jobs stay in its slot) or keep draining until `stop`."""

    async def main() -> None:
        async with JobProducer(settings(url, Path(path))) as producer:
            receipts = []
            for n in range(PER_KEY):
                for k in range(KEYS):
                    key = f"p{number}-k{k}"
                    receipt = await producer.publish(RecordJob(seq=n, key=key), key=key)
                    receipts.append((receipt.job_id, receipt.spooled))
            spooling = producer._spooling
            assert spooling is not None
            results.put((number, str(spooling.spool.path), receipts))
            if not leave:  # drain (and take over the slot left behind) until told to stop
                await asyncio.to_thread(stop.wait)

    asyncio.run(main())


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path / "nats-store")
    yield server
    server.stop(signal.SIGKILL)


async def read_stream(url: str) -> list[tuple[str, int, str]]:
    client = await nats.connect(url)
    found = []
    try:
        js = client.jetstream()
        info = await js.stream_info(STREAM)
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(STREAM, sequence)
            body = json.loads(message.data or b"{}")
            found.append((body["key"], body["seq"], (message.headers or {})["ce-id"]))
    finally:
        await client.close()
    return found


@pytest.mark.timeout(180)
async def test_three_processes_share_one_spool_path_and_every_job_arrives_once(
    own_nats: OwnServer, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    stop = spawn.Event()
    processes = [
        spawn.Process(
            target=producer_process,
            args=(n, own_nats.url, str(path), results, stop, n == 0),
            daemon=True,
        )
        for n in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        reports = [await asyncio.to_thread(results.get, True, 60) for _ in processes]
        slots = sorted(slot for _, slot, _ in reports)
        assert slots == [str(path), f"{path}.1", f"{path}.2"]  # a slot each
        sent = {number: receipts for number, _, receipts in reports}
        assert all(spooled for receipts in sent.values() for _, spooled in receipts)
        await asyncio.to_thread(processes[0].join, 30)  # gone, its jobs still spooled
        assert read_spool_status(path).jobs == PROCESSES * KEYS * PER_KEY

        await own_nats.start()
        await asyncio.sleep(1.0)  # the drainers find the stream missing: blocked, kept
        assert read_spool_status(path).jobs == PROCESSES * KEYS * PER_KEY
        async with JobProducer(settings(own_nats.url, tmp_path / "provision.db")) as provision:
            await provision.ensure(["test.record"])
        deadline = time.monotonic() + 60
        while (status := read_spool_status(path)).jobs and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert (status.jobs, status.blocked) == (0, {}), status
    finally:
        stop.set()
        for process in processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
    found = await read_stream(own_nats.url)
    ids = [job_id for *_, job_id in found]
    assert sorted(ids) == sorted(job_id for r in sent.values() for job_id, _ in r)  # once each
    per_key: dict[str, list[int]] = {}
    for key, seq, _ in found:
        per_key.setdefault(key, []).append(seq)
    assert len(per_key) == PROCESSES * KEYS
    for key, numbers in per_key.items():
        assert numbers == sorted(numbers), f"key {key} out of order"
